// Small DOM helpers. Everything that came from the server goes in as text (textContent or a
// Text node), never as HTML, so a class name or a generated token cannot inject markup.

/** el("div", {class: "x", testid: "y", onclick: f}, child, "text", ...) → an element. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key === "testid") node.dataset.testid = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

/** A description list from [term, value] pairs; values are text or nodes. */
export function pairs(entries, testid) {
  const list = el("dl", { class: "pairs", testid });
  for (const [term, value, title] of entries) {
    list.append(el("dt", { text: term }), el("dd", { title }, value));
  }
  return list;
}

/** Numbers for people: integers grouped, others to `digits` significant digits. */
export function formatNumber(value, digits = 4) {
  if (typeof value !== "number" || !Number.isFinite(value)) return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(digits - 1);
  return String(Number(value.toPrecision(digits)));
}

/** 12345678 → "12.3M" (parameter counts). */
export function compact(value) {
  if (typeof value !== "number") return String(value);
  for (const [size, unit] of [[1e9, "B"], [1e6, "M"], [1e3, "K"]]) {
    if (Math.abs(value) >= size) return `${Number((value / size).toPrecision(3))}${unit}`;
  }
  return String(value);
}

export function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

/** Replace a container's content with new nodes. */
export function show(container, ...nodes) {
  container.replaceChildren(...nodes.flat().filter(Boolean));
}
