// Building the page from API values. Every value reaches the document as text (a text
// node, or textContent): nothing here parses markup, and the page's Content-Security-
// Policy requires Trusted Types, so the browser throws on any innerHTML of a string.

const ATTRIBUTES = new Set(["id", "class", "type", "title", "role", "scope", "colspan"]);

/** An internal link: "#/" followed by path segments, each URI-encoded. */
export function link(...segments) {
  return "#/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
}

/**
 * A new element. props: an attribute of ATTRIBUTES, "href" (an internal "#/" link
 * only), "data-*", "hidden", or "onclick" (a function). Children: nodes, or values put
 * in as text (null and undefined are skipped).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "onclick") {
      node.addEventListener("click", value);
    } else if (key === "href") {
      const href = String(value);
      if (!href.startsWith("#/")) throw new Error(`refused a link that is not internal: ${href}`);
      node.setAttribute("href", href);
    } else if (key === "hidden") {
      node.hidden = true;
    } else if (ATTRIBUTES.has(key) || key.startsWith("data-")) {
      node.setAttribute(key, String(value));
    } else {
      throw new Error(`el: attribute ${key} is not allowed`);
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** A table: headers (a string, or [text, class]) and rows of cells (values or nodes). */
export function table(id, headers, rows, rowProps = () => ({})) {
  const head = el("tr", {}, headers.map((h) => {
    const [text, cls] = Array.isArray(h) ? h : [h, undefined];
    return el("th", { scope: "col", class: cls }, text);
  }));
  const body = rows.map((row, i) => el("tr", rowProps(row, i), row.cells.map((c) =>
    c instanceof Node ? el("td", {}, c) : el("td", isNum(c) ? { class: "num" } : {}, cellText(c)))));
  return el("table", { id }, el("thead", {}, head), el("tbody", {}, body));
}

function isNum(c) {
  return c !== null && typeof c === "object" && "num" in c;
}

function cellText(c) {
  if (c === null || c === undefined) return "";
  return isNum(c) ? String(c.num) : String(c);
}

/** Free text that may hold long unbroken runs (digests, errors): wraps anywhere. */
export function long(text) {
  return el("span", { class: "long" }, text ?? "");
}

/** A number cell (right-aligned). */
export function num(n) {
  return { num: n };
}

/** A status word as a badge, coloured by its class. */
export function badge(word, props = {}) {
  return el("span", { class: `badge state-${String(word).replace(/[^a-z-]/g, "")}`, ...props }, word);
}

/** A time from the API (ISO 8601) as "YYYY-MM-DD HH:MM:SSZ" in UTC; "" for none. */
export function when(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  return Number.isNaN(t.getTime()) ? String(iso) : t.toISOString().slice(0, 19).replace("T", " ") + "Z";
}

/** Counts per key, sorted by count (largest first), then key. */
export function countBy(items, key) {
  const counts = new Map();
  for (const item of items) {
    const k = key(item);
    counts.set(k, (counts.get(k) || 0) + 1);
  }
  return [...counts.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
}

/** A definition list of [term, value] pairs (values as text, or nodes). */
export function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}
