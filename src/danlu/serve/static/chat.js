// The language-model page: a message list and an input box. Chat runs (task "chat") send the
// whole conversation to POST /v1/chat/completions; other generators (language_modeling,
// seq2seq) send each prompt to POST /v1/completions. Both stream (stream: true): tokens are
// appended to the assistant bubble as their events arrive; Stop aborts the request.

import { ApiError, request, streamEvents } from "./api.js";
import { el, show } from "./dom.js";

const DEFAULT_MAX_TOKENS = 64;
const DEFAULT_TEMPERATURE = 0.8;

function number(id, label, attrs) {
  const input = el("input", { id, type: "number", ...attrs });
  return { input, node: el("div", { class: "field inline" },
    el("label", { for: id, text: label }), input) };
}

function bubble(role, text) {
  const body = el("div", { class: "bubble-text" });
  const content = document.createTextNode(text); // streamed tokens are appended here
  body.append(content);
  const node = el("li", { class: `msg ${role}`, "data-role": role,
    testid: role === "assistant" ? "assistant-message" : "user-message" },
  el("span", { class: "who", text: role === "assistant" ? "Model" : "You" }), body);
  return { node, content };
}

/** The text piece of one streamed chunk (chat: delta.content; completions: text). */
function pieceOf(chunk) {
  const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : null;
  if (!choice) return { text: "", finish: null };
  const text = choice.delta ? choice.delta.content : choice.text;
  return { text: typeof text === "string" ? text : "", finish: choice.finish_reason || null };
}

/** Fill the workspace with the chat page for a generator; returns a function that stops any
 * answer still streaming (called when another model is opened). */
export function renderChat(root, model, ctx) {
  const isChat = model.task === "chat";
  const history = []; // chat runs: every {role, content} so far
  let controller = null;

  const list = el("ol", { class: "messages", testid: "messages", role: "log",
    "aria-live": "polite", "aria-label": "Conversation" });
  const box = el("textarea", { id: "chat-input", testid: "chat-input", rows: 3,
    placeholder: isChat ? "Send a message… (Enter sends, Shift+Enter for a new line)"
      : "Type a prompt for the model to continue… (Enter sends)" });
  const maxTokens = number("max-tokens", "Max tokens",
    { testid: "max-tokens", min: 1, step: 1, value: DEFAULT_MAX_TOKENS });
  const temperature = number("temperature", "Temperature",
    { testid: "temperature", min: 0, max: 2, step: 0.1, value: DEFAULT_TEMPERATURE });
  const send = el("button", { type: "submit", class: "primary", testid: "send", text: "Send" });
  const stop = el("button", { type: "button", testid: "stop", text: "Stop", disabled: true });
  const clear = el("button", { type: "button", class: "linkish", testid: "clear",
    text: "Clear conversation" });
  const form = el("form", { class: "composer", testid: "chat-form" },
    el("label", { for: "chat-input", class: "sr-only", text: "Message" }), box,
    el("div", { class: "controls" }, maxTokens.node, temperature.node,
      el("div", { class: "actions" }, clear, stop, send)));

  function settings() {
    const tokens = Number.parseInt(maxTokens.input.value, 10);
    const temp = Number.parseFloat(temperature.input.value);
    return {
      max_tokens: Number.isFinite(tokens) && tokens > 0 ? tokens : DEFAULT_MAX_TOKENS,
      temperature: Number.isFinite(temp) && temp >= 0 ? temp : DEFAULT_TEMPERATURE,
    };
  }

  function busy(on) {
    send.disabled = on;
    stop.disabled = !on;
    list.setAttribute("aria-busy", on ? "true" : "false");
  }

  async function stream(reply, path, body) {
    const response = await request(path, { body, signal: controller.signal });
    let chunks = 0;
    let finish = null;
    for await (const chunk of streamEvents(response)) {
      const piece = pieceOf(chunk);
      if (piece.text) {
        reply.content.appendData(piece.text);
        reply.node.dataset.chunks = String(++chunks);
        list.scrollTop = list.scrollHeight;
      }
      finish = piece.finish || finish;
    }
    if (finish) reply.node.dataset.finish = finish;
  }

  async function submit(text) {
    ctx.clearError();
    const user = bubble("user", text);
    const reply = bubble("assistant", "");
    reply.node.dataset.state = "streaming";
    reply.node.dataset.chunks = "0";
    list.append(user.node, reply.node);
    list.scrollTop = list.scrollHeight;
    const common = { model: model.id, stream: true, ...settings() };
    if (isChat) history.push({ role: "user", content: text });
    const [path, body] = isChat
      ? ["v1/chat/completions", { ...common, messages: history.slice() }]
      : ["v1/completions", { ...common, prompt: text }];
    controller = new AbortController();
    busy(true);
    try {
      await stream(reply, path, body);
      reply.node.dataset.state = "done";
    } catch (err) {
      const aborted = err && err.name === "AbortError";
      reply.node.dataset.state = aborted ? "stopped" : "error";
      if (!aborted) ctx.showError(err instanceof ApiError ? err : String(err));
      if (!aborted && isChat) history.pop(); // a failed turn is not part of the conversation
    } finally {
      if (isChat && reply.node.dataset.state !== "error") {
        history.push({ role: "assistant", content: reply.content.data });
      }
      controller = null;
      busy(false);
      box.focus();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = box.value;
    if (!text.trim()) {
      ctx.showError(isChat ? "Type a message first." : "Type a prompt first.");
      return;
    }
    if (controller) return; // one answer at a time
    box.value = "";
    submit(text);
  });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  clear.addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    list.replaceChildren();
  });

  const mode = isChat ? "Chat: the whole conversation is sent each turn."
    : "Completion: each prompt is continued on its own.";
  show(root,
    el("h2", { text: isChat ? "Chat" : "Generate" }),
    el("p", { class: "muted", testid: "chat-mode", text: mode }),
    list, form);
  return () => controller && controller.abort();
}
