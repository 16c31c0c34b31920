// The classifier / regressor page: one input form per input kind (a text box, an image file
// with a preview, or one field per table feature), POST /v1/predict with one item, and the
// answer: the label big, its confidence and a bar per class (top 10), or the regressed value.

import { postJSON } from "./api.js";
import { el, formatNumber, percent, show } from "./dom.js";

const TOP = 10;

// ------------------------------------------------------------------------------ inputs

function textInput() {
  const box = el("textarea", {
    id: "text-input", testid: "text-input", rows: 6, required: true,
    placeholder: "Type or paste a text to classify…",
  });
  return {
    nodes: [el("label", { for: "text-input", text: "Text" }), box],
    read: () => (box.value.trim() ? box.value : null),
    missing: "Type a text first.",
  };
}

function imageInput(info) {
  const image = info.image;
  const file = el("input", { id: "image-input", testid: "image-input", type: "file",
    accept: "image/*" });
  const preview = el("img", { class: "preview", testid: "image-preview", alt: "", hidden: true });
  const hint = image
    ? `The model takes ${image.width}×${image.height} images with ${image.channels} channel(s).`
    : "Any image file.";
  let dataUrl = null;
  file.addEventListener("change", () => {
    dataUrl = null;
    preview.hidden = true;
    const chosen = file.files && file.files[0];
    if (!chosen) return;
    const reader = new FileReader();
    reader.addEventListener("load", () => {
      dataUrl = String(reader.result); // "data:image/png;base64,…": the server takes it as is
      preview.src = dataUrl;
      preview.alt = `Preview of ${chosen.name}`;
      preview.hidden = false;
    });
    reader.readAsDataURL(chosen);
  });
  return {
    nodes: [
      el("label", { for: "image-input", text: "Image" }), file,
      el("p", { class: "muted small", text: hint }), preview,
    ],
    read: () => dataUrl,
    missing: "Choose an image file first.",
  };
}

function featureField(feature, index) {
  const id = `feature-${index}`;
  const label = el("label", { for: id, text: feature.name });
  if (feature.type === "category" && Array.isArray(feature.values)) {
    const select = el("select", { id, testid: `feature-${feature.name}` },
      feature.values.map((v, i) => el("option", { value: i, text: String(v) })));
    return { nodes: [label, select], value: () => feature.values[Number(select.value)] };
  }
  const input = el("input", { id, testid: `feature-${feature.name}`, type: "number",
    step: "any", inputmode: "decimal", placeholder: "number" });
  const value = () => (input.value === "" ? null : Number(input.value));
  return { nodes: [label, input], value };
}

function tableInput(info) {
  const features = info.features || [];
  const fields = features.map(featureField);
  const grid = el("div", { class: "fields", testid: "feature-fields" },
    fields.map((f) => el("div", { class: "field" }, f.nodes)));
  return {
    nodes: [el("p", { class: "muted small", text: `${features.length} feature(s)` }), grid],
    read: () => Object.fromEntries(features.map((f, i) => [f.name, fields[i].value()])),
    missing: "Fill in the features first.",
  };
}

function inputFor(model) {
  const info = model.info || {};
  if (model.input === "image") return imageInput(info);
  if (model.input === "table") return tableInput(info);
  return textInput();
}

// ------------------------------------------------------------------------------ results

function bars(probabilities) {
  const sorted = Object.entries(probabilities || {}).sort((a, b) => b[1] - a[1]).slice(0, TOP);
  return el("ol", { class: "bars", testid: "bars", "aria-label": "Probability per class" },
    sorted.map(([name, p]) => {
      const fill = el("span", { class: "bar-fill" });
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      return el("li", { class: "bar", testid: "bar", title: `${name}: ${percent(p)}` },
        el("span", { class: "bar-name", testid: "bar-name", text: name }),
        el("span", { class: "bar-track", "aria-hidden": "true" }, fill),
        el("span", { class: "bar-value", text: percent(p) }));
    }));
}

function resultNodes(prediction) {
  if (prediction && "prediction" in prediction) {
    return [
      el("p", { class: "muted small", text: "Predicted value" }),
      el("p", { class: "big", testid: "result-value",
        text: formatNumber(prediction.prediction, 6) }),
    ];
  }
  return [
    el("p", { class: "muted small", text: "Predicted label" }),
    el("p", { class: "big", testid: "result-label", text: prediction.label }),
    el("p", { testid: "result-confidence", text: `${percent(prediction.confidence)} confidence` }),
    bars(prediction.probabilities),
  ];
}

function latency(ms) {
  return el("p", { class: "muted small", testid: "latency",
    text: `Answered in ${formatNumber(Number(ms))} ms (server time)` });
}

// ---------------------------------------------------------------------------------- page

/** Fill the workspace with the form for a classifier or regressor. */
export function renderPredict(root, model, ctx) {
  const input = inputFor(model);
  const button = el("button", { type: "submit", class: "primary", testid: "predict",
    text: "Predict" });
  const result = el("section", { class: "result", testid: "result", "aria-live": "polite",
    "aria-label": "Prediction", hidden: true });
  const form = el("form", { class: "stack", testid: "predict-form", novalidate: true },
    input.nodes, el("div", { class: "actions" }, button));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const item = input.read();
    if (item === null || item === undefined) {
      ctx.showError(input.missing);
      return;
    }
    ctx.clearError();
    button.disabled = true;
    button.textContent = "Predicting…";
    result.setAttribute("aria-busy", "true");
    try {
      const answer = await postJSON("v1/predict", { model: model.id, inputs: [item] });
      show(result, resultNodes(answer.predictions[0]), latency(answer.latency_ms));
      result.hidden = false;
    } catch (err) {
      ctx.showError(err);
    } finally {
      button.disabled = false;
      button.textContent = "Predict";
      result.removeAttribute("aria-busy");
    }
  });

  const what = { text: "a text", image: "an image", table: "a table row" }[model.input];
  show(root,
    el("h2", { text: model.kind === "regressor" ? "Predict a value" : "Classify" }),
    el("p", { class: "muted", text: `Give the model ${what || "an input"} and press Predict.` }),
    form, result);
}
