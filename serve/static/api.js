// The HTTP API of the same server: every /v1 call carries the API key kept in sessionStorage.

const KEY = "vlsae-api-key";

export const getKey = () => sessionStorage.getItem(KEY) || "";
export const setKey = (key) => sessionStorage.setItem(KEY, key);

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function send(path, init) {
  let response;
  try {
    response = await fetch(path.replace(/^\//, ""), init);
  } catch {
    throw new ApiError(0, "the server cannot be reached");
  }
  if (response.ok) return response;
  let detail = response.statusText;
  try {
    const body = await response.json();
    // FastAPI's validation errors (422) list each bad field
    detail = Array.isArray(body.detail)
      ? body.detail.map((error) => `${error.loc.at(-1)}: ${error.msg}`).join("; ")
      : String(body.detail);
  } catch {
    // not JSON: keep the status text
  }
  throw new ApiError(response.status, detail);
}

export async function get(path, query = {}) {
  const params = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== "" && v != null));
  const url = params.size ? `${path}?${params}` : path;
  return (await send(url, { headers: headers() })).json();
}

export async function post(path, body) {
  const json = headers({ "Content-Type": "application/json" });
  return (await send(path, { method: "POST", headers: json, body: JSON.stringify(body) })).json();
}

// An image route needs the key too, so it is fetched here and shown through a blob URL.
export async function imageURL(path) {
  return URL.createObjectURL(await (await send(path, { headers: headers() })).blob());
}

// The base64 of a file's bytes, as the API takes images.
export async function base64(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

export function explain(error) {
  if (!(error instanceof ApiError)) return `Something went wrong in the page: ${error.message}`;
  if (error.status === 0) return `The server cannot be reached. Is it running?`;
  if (error.status === 401) return `The server refused the API key (401: ${error.detail}). Enter the right key above.`;
  if (error.status < 500) return `The server refused the request (${error.status}): ${error.detail}`;
  return `The server failed (${error.status}): ${error.detail}. Try again in a moment.`;
}
