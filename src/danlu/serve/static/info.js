// The model-info panel: what is served (task, input, variant), how well it did on its test
// split (headline metrics first), where it came from (lineage) and the classes it knows.

import { compact, el, formatNumber, pairs, show } from "./dom.js";

// Shown first, in this order, when present; the rest of the scalar metrics fold away.
const HEADLINE = [
  "accuracy", "f1_macro", "roc_auc", "rmse", "mae", "r2", "perplexity", "loss", "bleu",
  "chrf", "rouge_l", "exact_match", "log_loss", "ece", "precision_macro", "recall_macro",
];
const SHOWN = 5;
const LINEAGE = [
  ["run", "Run"], ["parent", "Parent run"], ["config_hash", "Config hash"],
  ["data_hash", "Data hash"], ["started", "Started"], ["ended", "Ended"],
  ["parameters", "Parameters"], ["trainable_parameters", "Trainable parameters"],
  ["precision", "Precision"], ["device", "Device"], ["steps", "Steps"], ["status", "Status"],
];
const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}/;
const MAX_CLASSES = 60;

function isScalar(value) {
  return (typeof value === "number" && Number.isFinite(value)) || typeof value === "string";
}

/** Scalar test metrics, headline ones first ([name, value] pairs). */
export function orderedMetrics(metrics) {
  const numeric = Object.entries(metrics || {}).filter(
    ([name, v]) => typeof v === "number" && Number.isFinite(v) && name !== "count",
  );
  const lead = metrics && typeof metrics.headline === "string" ? [metrics.headline] : [];
  const rank = (name) => {
    const i = [...lead, ...HEADLINE].indexOf(name);
    return i < 0 ? Infinity : i;
  };
  return numeric.sort((a, b) => rank(a[0]) - rank(b[0]) || a[0].localeCompare(b[0]));
}

function metricsBlock(metrics, split) {
  const test = metrics && typeof metrics.test === "object" ? metrics.test : metrics; // whole file
  const ordered = orderedMetrics(test);
  const title = split && split !== "test" ? `Metrics (${split} split)` : "Test metrics";
  const block = el("section", { class: "block" }, el("h3", { text: title }));
  if (!ordered.length) {
    block.append(el("p", { class: "muted", text: "None recorded yet (danlu evaluate RUN)." }));
    return block;
  }
  const row = ([name, value]) => [name, formatNumber(value)];
  block.append(pairs(ordered.slice(0, SHOWN).map(row), "metrics"));
  if (ordered.length > SHOWN) {
    block.append(
      el("details", {},
        el("summary", { text: `${ordered.length - SHOWN} more` }),
        pairs(ordered.slice(SHOWN).map(row), "metrics-more")),
    );
  }
  return block;
}

function shortHash(value) {
  const text = String(value);
  return [text.length > 12 ? text.slice(0, 12) : text, text];
}

/** [shown text, full value for the tooltip] of one lineage entry. */
function lineageValue(key, value) {
  if (key.endsWith("_hash")) return shortHash(value);
  if (key.endsWith("parameters") && typeof value === "number") {
    return [value >= 1000 ? `${compact(value)} (${formatNumber(value)})` : String(value)];
  }
  if (typeof value === "number") return [formatNumber(value)];
  if (typeof value === "string" && ISO_TIME.test(value)) {
    const date = new Date(value);
    const options = { dateStyle: "medium", timeStyle: "short" };
    if (!Number.isNaN(date.getTime())) return [date.toLocaleString(undefined, options), value];
  }
  if (typeof value === "object" && value !== null) return [JSON.stringify(value)];
  return [String(value)];
}

function humanKey(key) {
  const words = key.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function lineageBlock(lineage) {
  const known = new Map(LINEAGE);
  const entries = [];
  for (const [key, label] of LINEAGE) {
    const value = lineage && lineage[key];
    if (value === null || value === undefined || value === "") continue;
    const [text, title] = lineageValue(key, value);
    entries.push([label, text, title]);
  }
  for (const [key, value] of Object.entries(lineage || {})) {
    if (!known.has(key) && isScalar(value)) {
      entries.push([humanKey(key), ...lineageValue(key, value)]);
    }
  }
  const block = el("section", { class: "block" }, el("h3", { text: "Lineage" }));
  block.append(entries.length ? pairs(entries, "lineage")
    : el("p", { class: "muted", text: "No lineage recorded." }));
  return block;
}

function classesBlock(classes) {
  if (!Array.isArray(classes) || !classes.length) return null;
  const list = el("ul", { class: "chips", testid: "classes", "aria-label": "Classes" });
  for (const name of classes.slice(0, MAX_CLASSES)) list.append(el("li", { text: name }));
  if (classes.length > MAX_CLASSES) {
    list.append(el("li", { class: "muted", text: `+${classes.length - MAX_CLASSES} more` }));
  }
  return el("section", { class: "block" },
    el("h3", { text: `Classes (${classes.length})` }), list);
}

function badges(model) {
  const info = model.info || {};
  const items = [
    ["task", model.task], ["input", model.input], ["kind", model.kind],
    ["variant", info.variant || "original"],
  ];
  return el("ul", { class: "badges", testid: "badges" },
    items.filter(([, v]) => v).map(([k, v]) =>
      el("li", { title: k, "data-key": k }, el("span", { class: "muted", text: `${k} ` }), v)));
}

/** Fill the panel for one model (GET /v1/models/{name}). */
export function renderInfo(panel, model) {
  const info = model.info || {};
  show(
    panel,
    el("h2", { id: "info-title", class: "model-id", testid: "model-id", text: model.id }),
    badges(model),
    metricsBlock(info.metrics, info.metrics_split),
    lineageBlock(info.lineage),
    classesBlock(info.classes),
  );
}
