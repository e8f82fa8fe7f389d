// Steer: edit one latent by a strength on a slider; the model's default and steered outputs side by side.

import { get, post } from "./api.js";
import { h, latentLabel, number, title } from "./dom.js";
import { chosenImage, imagePicker } from "./image.js";
import { attempt } from "./message.js";

const OPS = { set: "set to", add: "add", scale: "scale by", ablate: "ablate" };

// LLaVA's answer, or CLIP's most probable label over bars of every label's probability.
function output(heading, result) {
  const labels = [...(result.labels ?? [])].sort((a, b) => b.probability - a.probability);
  const answer = result.answer ?? labels[0]?.label ?? "–";
  const bars = labels.map(({ label, probability }) =>
    h(
      "li",
      {},
      h("span", { className: "name" }, label),
      h("span", { className: "value" }, `${(100 * probability).toFixed(1)}%`),
      h("span", { className: "bar", style: `width: ${100 * probability}%` }),
    ),
  );
  return h(
    "section",
    { className: "output" },
    h("h2", {}, heading),
    h("p", { className: "answer" }, answer),
    bars.length ? h("ol", { className: "labels", "aria-label": "zero-shot probabilities" }, bars) : null,
  );
}

// A labelled control, with whatever follows it on its line (the latent's name, the slider's value).
function field(label, control, ...after) {
  return h("p", { className: "field" }, h("label", { htmlFor: control.id }, label), control, ...after);
}

export async function steerView(params, saes) {
  const saeOptions = saes.map((s) => h("option", { value: s.id, selected: s.id === params.sae }, s.id));
  const sae = h("select", { id: "steer-sae" }, saeOptions);
  const latent = h("input", { id: "steer-latent", type: "number", min: 0, step: 1, value: params.latent ?? 0 });
  latent.required = true;
  const latentName = h("output", { htmlFor: "steer-latent" });
  const op = h("select", { id: "steer-op" }, Object.entries(OPS).map(([value, text]) => h("option", { value }, text)));
  const strength = h("input", { id: "steer-strength", type: "range", min: -30, max: 30, step: 0.5, value: 1 });
  const strengthValue = h("output", { htmlFor: "steer-strength" });
  const labels = h("textarea", { id: "steer-labels", rows: 4 }, "red\ngreen\nblue\nyellow\npurple\norange\nwhite");
  const question = h("input", { id: "steer-question", type: "text", value: "What colour are the objects?" });
  const outputs = h("div", { className: "outputs", "aria-live": "polite" });
  const preview = h("div", { className: "steer-image" });

  const showImage = (image) =>
    preview.replaceChildren(
      image
        ? h("img", { src: image.url, alt: `the chosen image ${image.name}` })
        : h("p", {}, "Choose an image to steer on."),
    );
  const describe = async () => {
    const entry = await attempt(() => get(`/v1/saes/${encodeURIComponent(sae.value)}/latents/${latent.value}`));
    latentName.textContent = entry ? latentLabel(entry) : "";
  };
  const showStrength = () => {
    strengthValue.textContent = Number(strength.value).toFixed(1);
    strength.disabled = op.value === "ablate";
  };

  let sent = 0; // only the latest request's answer is shown
  async function steer() {
    const image = chosenImage();
    if (!image || !latent.checkValidity()) return;
    const id = ++sent;
    const body = {
      sae: sae.value,
      image: image.base64,
      edits: [{ latent: Number(latent.value), value: Number(strength.value), op: op.value }],
      strength: "relative",
      labels: labels.value.split("\n").map((line) => line.trim()).filter(Boolean),
      question: question.value.trim() || null,
    };
    const answer = await attempt(() => post("/v1/steer", body));
    if (!answer || id !== sent) return;
    const edit = op.value === "ablate" ? "ablated" : `${OPS[op.value]} ${strengthValue.textContent} × its max`;
    const steered = output(`Steered: latent ${body.edits[0].latent} ${edit}`, answer.steered);
    outputs.replaceChildren(output("Default", answer.default), steered);
  }

  let timer; // while the slider moves, steer once it rests for a moment
  strength.addEventListener("input", () => {
    showStrength();
    clearTimeout(timer);
    timer = setTimeout(steer, 150);
  });
  op.addEventListener("change", () => (showStrength(), steer()));
  for (const control of [labels, question]) control.addEventListener("change", steer);
  for (const control of [sae, latent]) control.addEventListener("change", () => (describe(), steer()));

  const form = h(
    "form",
    { className: "steer", onsubmit: (event) => (event.preventDefault(), steer()) },
    field("SAE", sae),
    field("Latent", latent, latentName),
    field("Edit", op),
    field("Strength (× the latent's max activation)", strength, strengthValue),
    field("Labels (CLIP: zero-shot over these, one a line)", labels),
    field("Question (LLaVA)", question),
    h("p", {}, h("button", { type: "submit" }, "Steer")),
  );
  const picker = imagePicker("steer-file", (image) => (showImage(image), steer()));
  showImage(chosenImage());
  showStrength();
  describe();
  steer();
  return h(
    "section",
    {},
    title("Steer"),
    h("div", { className: "steer-layout" }, h("div", {}, picker, preview, form), outputs),
  );
}
