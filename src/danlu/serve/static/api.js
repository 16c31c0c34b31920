// The playground's HTTP client: JSON requests with the optional API key, the server's error
// shape ({"error": {"message", "type", ...}}) turned into an ApiError, and server-sent events
// read from a POST response with fetch + a stream reader (EventSource can only GET).

const KEY_STORAGE = "danlu.apiKey";

export class ApiError extends Error {
  constructor(message, status = 0, type = "error") {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
  }
}

export const apiKey = {
  get() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return ""; // storage disabled (private mode, file://): no key
    }
  },
  set(value) {
    try {
      if (value) localStorage.setItem(KEY_STORAGE, value);
      else localStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage disabled: the key lives for this page only */
    }
  },
};

// Paths are relative to the page, so the playground also works behind a path prefix.
function url(path) {
  return new URL(path, document.baseURI).toString();
}

function headers(json) {
  const out = { Accept: json ? "application/json, text/event-stream" : "application/json" };
  if (json) out["Content-Type"] = "application/json";
  const key = apiKey.get();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let type = "http_error";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = String(body.error.message);
      type = String(body.error.type || type);
    }
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(message, response.status, type);
}

/** fetch(path) with the key; a non-2xx answer throws its ApiError. */
export async function request(path, { body, signal } = {}) {
  let response;
  try {
    response = await fetch(url(path), {
      method: body === undefined ? "GET" : "POST",
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(`cannot reach the server (${err && err.message})`, 0, "network_error");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** GET /ready's body whatever its status (503 while loading), or null when unreachable. */
export async function readiness() {
  try {
    return await (await fetch(url("ready"), { headers: { Accept: "application/json" } })).json();
  } catch {
    return null;
  }
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function postJSON(path, body, signal) {
  return (await request(path, { body, signal })).json();
}

// One event ends at a blank line; servers use \n, \r\n or \r line ends.
const EVENT_END = /\r\n\r\n|\n\n|\r\r/;

function eventData(block) {
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return data.length ? data.join("\n") : null; // comments / other fields only
}

/** The data of each server-sent event of a streamed response, as text, until [DONE]. */
export async function* streamEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  try {
    while (!finished) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const blocks = buffer.split(EVENT_END);
      buffer = done ? "" : blocks.pop();
      for (const block of blocks) {
        const data = eventData(block);
        if (data === null) continue;
        if (data.trim() === "[DONE]") {
          finished = true;
          break;
        }
        yield parseEvent(data);
      }
      if (done) break;
    }
  } finally {
    reader.cancel().catch(() => {}); // stop reading if the consumer left early
  }
}

function parseEvent(data) {
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    throw new ApiError(`the server sent an unreadable event: ${data.slice(0, 80)}`);
  }
  if (event && event.error) {
    const err = event.error;
    throw new ApiError(String(err.message || "stream failed"), err.code || 0, err.type);
  }
  return event;
}
