// Small helpers shared by the views: building elements and formatting numbers.

// h("a", {href: "#/x"}, "text", child, ...): an element with attributes (on* are listeners) and children.
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value == null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name in element && !name.includes("-")) element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...children.flat().filter((child) => child != null));
  return element;
}

export function number(value, digits = 2) {
  return value == null || Number.isNaN(value) ? "–" : value.toFixed(digits);
}

export function percent(value) {
  if (value == null) return "–";
  return value >= 0.001 ? `${(100 * value).toFixed(1)}%` : `${(100 * value).toPrecision(2)}%`;
}

export const latentHash = (sae, latent) => `#/saes/${encodeURIComponent(sae)}/latents/${latent}`;

export function latentLabel(latent) {
  return latent.name ?? "unnamed";
}

// A heading that takes focus when a view opens, so keyboard and screen-reader users land on it.
export function title(text) {
  return h("h1", { tabIndex: -1, className: "title" }, text);
}
