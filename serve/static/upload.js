// Upload an image: its top concepts with their values; choosing one draws that latent's map over it.

import { post } from "./api.js";
import { h, latentHash, latentLabel, number, title } from "./dom.js";
import { chosenImage, drawMap, imagePicker, overlaid } from "./image.js";
import { attempt } from "./message.js";

const TOP_K = 10;

export async function uploadView(_params, saes) {
  const sae = h("select", { id: "upload-sae" }, saes.map((s) => h("option", { value: s.id }, s.id)));
  const result = h("div", { className: "upload-result", "aria-live": "polite" });
  let sent = 0; // only the latest request's answer is shown

  async function encode(image) {
    const shown = overlaid(image);
    result.replaceChildren(shown.element, h("p", {}, "Encoding…"));
    const request = { sae: sae.value, images: [image.base64], top_k: TOP_K };
    const id = ++sent;
    const answer = await attempt(() => post("/v1/encode", request));
    if (!answer || id !== sent) return;
    const latents = answer.results[0].latents;
    const showMap = async (latent, button) => {
      const mine = ++sent;
      const mapped = await attempt(() => post("/v1/encode", { ...request, map_latent: latent }));
      if (!mapped || mine !== sent) return;
      drawMap(shown.canvas, mapped.results[0].map);
      for (const other of list.querySelectorAll("button")) other.setAttribute("aria-pressed", other === button);
      caption.textContent = `Overlay: where latent ${latent} fires on the image's patches (more orange: stronger)`;
    };
    const most = Math.max(...latents.map((l) => l.activation), 1e-12);
    const list = h(
      "ol",
      { className: "concepts" },
      latents.map((latent) => {
        const button = h(
          "button",
          { type: "button", "aria-pressed": "false", onclick: () => showMap(latent.latent, button) },
          h("span", { className: "name" }, latentLabel(latent)),
          h("span", { className: "value" }, number(latent.activation)),
          h("span", { className: "bar", style: `width: ${(100 * latent.activation) / most}%` }),
        );
        return h("li", {}, button, h("a", { href: latentHash(answer.sae, latent.latent) }, `#${latent.latent}`));
      }),
    );
    const caption = h("p", { className: "hint" }, "Choose a concept to see where it fires.");
    result.replaceChildren(
      h("div", { className: "figure" }, shown.element, caption),
      h("div", {}, h("h2", {}, "Top concepts"), latents.length ? list : h("p", {}, "No latent fires on this image.")),
    );
    if (latents.length) await showMap(latents[0].latent, list.querySelector("button"));
  }

  sae.addEventListener("change", () => chosenImage() && encode(chosenImage()));
  const view = h(
    "section",
    {},
    title("Upload an image"),
    h("p", { className: "picker" }, h("label", { htmlFor: "upload-sae" }, "SAE"), sae),
    imagePicker("upload-file", encode),
    result,
  );
  if (chosenImage()) encode(chosenImage());
  return view;
}
