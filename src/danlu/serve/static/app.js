// danlu playground: the page at "/" of `danlu serve`. Plain ES modules, no build step and no
// network beyond this server. On load it lists the served models (GET /v1/models), offers a
// picker when there are several, fills the info panel (GET /v1/models/{name}) and opens the
// page for the model's kind: a predict form (classifier / regressor) or a chat (generator).
// API errors land in one visible error box; an optional API key is kept in localStorage.

import { ApiError, apiKey, getJSON, readiness } from "./api.js";
import { renderChat } from "./chat.js";
import { el, show } from "./dom.js";
import { renderInfo } from "./info.js";
import { renderPredict } from "./predict.js";

const LOADING_RETRY_MS = 1000;
const LOADING_TRIES = 300; // models still loading: ask /ready for up to ~5 minutes

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

const ui = {
  picker: $("model-picker"),
  pickerWrap: $("picker-wrap"),
  info: $("model-info"),
  workspace: $("workspace"),
  errorBox: $("error-box"),
  errorTitle: $("error-title"),
  errorMessage: $("error-message"),
  keyBox: $("key-box"),
  keyInput: $("api-key"),
};

// ---------------------------------------------------------------------------- errors

function showError(err) {
  const api = err instanceof ApiError;
  const message = api || err instanceof Error ? err.message : String(err);
  ui.errorTitle.textContent = api && err.status ? `Error ${err.status}` : "Error";
  ui.errorMessage.textContent = message;
  ui.errorBox.dataset.status = api ? String(err.status) : "";
  ui.errorBox.hidden = false;
  if (api && (err.status === 401 || err.status === 403)) {
    ui.keyBox.open = true; // the fix is right there
    ui.keyInput.focus();
  }
}

function clearError() {
  ui.errorBox.hidden = true;
  ui.errorMessage.textContent = "";
}

const ctx = { showError, clearError };
let leave = null; // stops what the open page is doing (a streaming answer) before another opens

function stopPage() {
  if (leave) leave();
  leave = null;
}

// ---------------------------------------------------------------------------- models

function status(text) {
  show(ui.info, el("h2", { id: "info-title", text: "Model" }),
    el("p", { class: "muted", testid: "status", text }));
}

async function showModel(name) {
  clearError();
  const model = await getJSON(`v1/models/${encodeURIComponent(name)}`);
  stopPage();
  renderInfo(ui.info, model);
  leave = model.kind === "generator" ? renderChat(ui.workspace, model, ctx)
    : renderPredict(ui.workspace, model, ctx);
  document.title = `${model.id} · danlu playground`;
  document.body.dataset.model = model.id;
  document.body.dataset.ready = "true";
}

function fillPicker(models, selected) {
  ui.picker.replaceChildren(
    ...models.map((m) => el("option", { value: m.id, text: `${m.id} (${m.task})` })));
  ui.picker.value = selected;
  ui.pickerWrap.hidden = models.length < 2;
}

async function waitReady() {
  for (let attempt = 1; attempt <= LOADING_TRIES; attempt++) {
    const body = await readiness();
    if (!body) throw new ApiError("cannot reach the server", 0, "network_error");
    if (body.status === "ready") return;
    if (body.status === "failed") {
      throw new ApiError(`the models failed to load: ${body.error}`, 503, "not_ready");
    }
    status(body.status === "stopping" ? "The server is stopping." : "Models are loading…");
    await new Promise((resolve) => setTimeout(resolve, LOADING_RETRY_MS));
  }
  throw new ApiError("the models are still not loaded; reload the page later", 503, "not_ready");
}

async function listModels() {
  await waitReady();
  return (await getJSON("v1/models")).data || [];
}

async function load() {
  delete document.body.dataset.ready;
  stopPage();
  status("Loading models…");
  show(ui.workspace);
  try {
    const models = await listModels();
    if (!models.length) {
      status("This server serves no models.");
      return;
    }
    const wanted = new URLSearchParams(location.hash.slice(1)).get("model");
    const selected = models.some((m) => m.id === wanted) ? wanted : models[0].id;
    fillPicker(models, selected);
    await showModel(selected);
  } catch (err) {
    status("Could not load the models.");
    showError(err);
  }
}

// ---------------------------------------------------------------------------- wiring

ui.picker.addEventListener("change", async () => {
  const name = ui.picker.value;
  history.replaceState(null, "", `#model=${encodeURIComponent(name)}`);
  try {
    await showModel(name);
  } catch (err) {
    showError(err);
  }
});

$("error-close").addEventListener("click", clearError);

function keySummary() {
  ui.keyBox.querySelector("summary").textContent = apiKey.get() ? "API key (set)" : "API key";
}

ui.keyInput.value = apiKey.get();
keySummary();
document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey.set(ui.keyInput.value.trim());
  keySummary();
  clearError();
  load();
});

load();
