// A latent's page: its name and scores, the histogram of its activations, its top images and captions.

import { get, imageURL } from "./api.js";
import { h, latentLabel, number, percent, title } from "./dom.js";

function svg(tag, attributes, ...children) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  element.append(...children);
  return element;
}

// Bars of equal width: the catalog's bins are log-spaced, so the x axis is the activation on a log scale.
function histogram({ edges, counts }) {
  const width = 600;
  const height = 140;
  const most = Math.max(...counts);
  const total = counts.reduce((a, b) => a + b, 0);
  const step = width / counts.length;
  const bars = counts.map((count, i) => {
    const tall = (height * count) / most;
    const bin = `[${number(edges[i], 3)}, ${number(edges[i + 1], 3)})`;
    const box = { x: i * step + 0.5, y: height - tall, width: Math.max(step - 1, 1), height: tall };
    return svg("rect", box, svg("title", {}, `${count} activations in ${bin}`));
  });
  const range = `from ${number(edges[0], 3)} to ${number(edges.at(-1), 3)}`;
  const chart = { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `histogram of ${total} activations ${range}` };
  return h(
    "figure",
    { className: "histogram" },
    svg("svg", chart, ...bars),
    h("div", { className: "axis" }, h("span", {}, number(edges[0], 3)), h("span", {}, number(edges.at(-1), 3))),
    h("figcaption", {}, `${total} positive activations over the label job's rows, ${range} (log scale; tallest bar ${most})`),
  );
}

function topImage({ source_id, activation, url }) {
  const img = h("img", { alt: `top image ${source_id}`, width: 128, height: 128 });
  imageURL(url).then(
    (src) => (img.src = src),
    () => img.replaceWith(h("p", { className: "broken" }, "image not available")),
  );
  const caption = h("figcaption", {}, h("strong", {}, number(activation)), " ", h("span", { className: "id" }, source_id));
  return h("figure", { className: "top-image" }, img, caption);
}

export async function latentView({ sae, latent }) {
  const entry = await get(`/v1/saes/${encodeURIComponent(sae)}/latents/${latent}`);
  const stat = (name, value) => h("div", {}, h("dt", {}, name), h("dd", {}, value));
  const steer = `#/steer?${new URLSearchParams({ sae, latent })}`;
  const similar = `#/search?${new URLSearchParams({ sae, q: entry.name ?? "" })}`;
  const sections = [
    title(`${sae} · latent ${latent}: ${latentLabel(entry)}`),
    h("p", { className: "actions" }, h("a", { href: steer }, "Steer with this latent"), " · ", h("a", { href: similar }, "Similar names")),
    h(
      "dl",
      { className: "stats" },
      stat("Runner-up", entry.runner_up ?? "–"),
      stat("Confidence", number(entry.confidence)),
      stat("Monosemanticity (MS)", number(entry.ms)),
      stat("Firing density", `${percent(entry.firing_density)} (${entry.firing_count ?? "–"} images)`),
      stat("Held-out AUROC", number(entry.heldout_auroc)),
      stat("Steerability", number(entry.steerability)),
      stat("Naming", entry.naming ?? "–"),
    ),
    h("h2", {}, "Activations"),
    entry.histogram
      ? histogram(entry.histogram)
      : h("p", {}, "No histogram: the latent never fired, or its catalog predates histograms."),
    h("h2", {}, "Top images"),
    entry.top_images.length
      ? h("div", { className: "gallery" }, entry.top_images.map(topImage))
      : h("p", {}, "It never fired on the label job's images."),
  ];
  if (entry.top_captions.length) {
    const caption = ({ caption, activation }) => h("li", {}, h("strong", {}, number(activation)), " ", caption);
    sections.push(h("h2", {}, "Top captions"), h("ol", { className: "captions" }, entry.top_captions.map(caption)));
  }
  return h("article", { className: "latent" }, ...sections);
}
