// The image a user chose (kept for the steer view too) and a latent's map drawn over it.

import { base64 } from "./api.js";
import { h } from "./dom.js";

let chosen = null; // {name, url, base64}

export const chosenImage = () => chosen;

export async function choose(file) {
  chosen = { name: file.name, url: URL.createObjectURL(file), base64: await base64(file) };
  return chosen;
}

// A file input that keeps the chosen image and then calls onchoose(image).
export function imagePicker(id, onchoose) {
  return h(
    "p",
    { className: "picker" },
    h("label", { htmlFor: id }, "Image"),
    h("input", {
      id,
      type: "file",
      accept: "image/png,image/jpeg",
      onchange: async (event) => event.target.files[0] && onchoose(await choose(event.target.files[0])),
    }),
  );
}

// The image, scaled up without smoothing, under a canvas that shows a map over its patches.
export function overlaid(image) {
  const img = h("img", { src: image.url, alt: `the chosen image ${image.name}` });
  const canvas = h("canvas", { className: "overlay", hidden: true, "aria-hidden": "true" });
  return { element: h("div", { className: "overlaid" }, img, canvas), img, canvas };
}

// Each patch a square of orange whose opacity is its value over the map's largest.
export function drawMap(canvas, { grid: [rows, columns], values }) {
  canvas.width = columns;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, columns, rows);
  const most = Math.max(...values, 1e-12);
  values.forEach((value, i) => {
    context.fillStyle = `rgba(255, 90, 0, ${(0.6 * Math.max(value, 0)) / most})`;
    context.fillRect(i % columns, Math.floor(i / columns), 1, 1);
  });
  canvas.hidden = false;
}
