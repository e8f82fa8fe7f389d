// Search: latents whose name matches, from one SAE or all of them, sorted by MS, confidence or density.

import { get } from "./api.js";
import { h, latentHash, latentLabel, number, percent, title } from "./dom.js";

// the API's sort keys: [column heading, the field sorted on]
const SORTS = {
  ms: ["MS", "ms"],
  confidence: ["Confidence", "confidence"],
  density: ["Firing density", "firing_density"],
};
const LIMIT = 50;

export async function searchView(params, saes) {
  const q = params.q || "";
  const sort = SORTS[params.sort] ? params.sort : "ms";
  const chosen = saes.some((sae) => sae.id === params.sae) ? [params.sae] : saes.map((sae) => sae.id);
  const pages = await Promise.all(
    chosen.map((id) => get(`/v1/saes/${encodeURIComponent(id)}/latents`, { q, sort, limit: LIMIT })),
  );
  const [heading, field] = SORTS[sort];
  const rows = pages
    .flatMap((page) => page.latents.map((latent) => ({ ...latent, sae: page.sae })))
    .sort((a, b) => (b[field] ?? -Infinity) - (a[field] ?? -Infinity))
    .slice(0, LIMIT);
  const total = pages.reduce((sum, page) => sum + page.total, 0);

  const go = (changes) => {
    location.hash = `#/search?${new URLSearchParams({ q, sort, sae: params.sae || "", ...changes })}`;
  };
  const submit = (event) => {
    event.preventDefault();
    go({ q: form.q.value.trim(), sae: form.sae.value });
  };
  const form = h(
    "form",
    { className: "search", role: "search", onsubmit: submit },
    h("label", { htmlFor: "q" }, "Concept name"),
    h("input", { id: "q", name: "q", type: "search", value: q, placeholder: "e.g. red, circles, striped" }),
    h("label", { htmlFor: "sae" }, "SAE"),
    h(
      "select",
      { id: "sae", name: "sae" },
      h("option", { value: "" }, "all SAEs"),
      saes.map((sae) => h("option", { value: sae.id, selected: sae.id === params.sae }, sae.id)),
    ),
    h("button", { type: "submit" }, "Search"),
  );

  const sortable = (key) =>
    h(
      "th",
      { scope: "col", "aria-sort": key === sort ? "descending" : null },
      h("button", { type: "button", className: "sort", onclick: () => go({ sort: key }) }, SORTS[key][0]),
    );
  const column = (text) => h("th", { scope: "col" }, text);
  const head = [column("Latent"), column("Name"), column("Runner-up")];
  head.push(sortable("confidence"), sortable("ms"), sortable("density"), column("Steerability"));
  const row = (latent) => {
    const link = chosen.length > 1 ? `${latent.sae} #${latent.latent}` : `#${latent.latent}`;
    return h(
      "tr",
      {},
      h("td", {}, h("a", { href: latentHash(latent.sae, latent.latent) }, link)),
      h("td", {}, latentLabel(latent)),
      h("td", {}, latent.runner_up ?? "–"),
      h("td", { className: "num" }, number(latent.confidence)),
      h("td", { className: "num" }, number(latent.ms)),
      h("td", { className: "num" }, percent(latent.firing_density)),
      h("td", { className: "num" }, number(latent.steerability)),
    );
  };
  const table = h(
    "table",
    { className: "results", "aria-describedby": "found" },
    h("thead", {}, h("tr", {}, head)),
    h("tbody", {}, rows.map(row)),
  );
  const matched = `${total} latent${total === 1 ? "" : "s"} match${q ? ` “${q}”` : ""}`;
  return h(
    "section",
    {},
    title("Search concepts"),
    form,
    h("p", { id: "found", className: "hint" }, `${matched}; the first ${rows.length} by ${heading}`),
    h("div", { className: "scroll" }, table),
  );
}
