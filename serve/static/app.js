// The concept explorer: a hash router over four views. Routes:
//   #/search?q=&sort=&sae=    latents by name across the server's SAEs
//   #/saes/SAE/latents/N      one latent's page
//   #/upload                  an image's top concepts and a latent's map over its patches
//   #/steer?sae=&latent=      default and steered outputs side by side

import { get, getKey, setKey } from "./api.js";
import { latentView } from "./latent.js";
import { clearError, showError } from "./message.js";
import { searchView } from "./search.js";
import { steerView } from "./steer.js";
import { uploadView } from "./upload.js";

const main = document.getElementById("main");
let saes = null; // GET /v1/saes, fetched once per key
let shown = 0; // the latest route rendered: a slower, older render does not overwrite it

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = Object.fromEntries(new URLSearchParams(query));
  if (parts[0] === "saes" && parts[2] === "latents" && parts.length === 4) {
    return [latentView, { sae: parts[1], latent: Number(parts[3]) }];
  }
  const views = { search: searchView, upload: uploadView, steer: steerView };
  return [views[parts[0]] || searchView, params];
}

async function render() {
  const token = ++shown;
  const [view, params] = route();
  clearError();
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", location.hash.startsWith(link.getAttribute("href")));
  }
  main.setAttribute("aria-busy", "true");
  try {
    saes ??= (await get("/v1/saes")).saes;
    const content = await view(params, saes);
    if (token !== shown) return;
    main.replaceChildren(content);
    main.querySelector(".title")?.focus();
  } catch (error) {
    if (token !== shown) return;
    saes = null;
    main.replaceChildren();
    showError(error);
  } finally {
    if (token === shown) main.removeAttribute("aria-busy");
  }
}

const keyForm = document.getElementById("key-form");
keyForm.key.value = getKey();
keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setKey(keyForm.key.value.trim());
  saes = null;
  render();
});
window.addEventListener("hashchange", render);
render();
