// The operator API, called with the operator's bearer token. The token lives in this
// tab's sessionStorage only: no cookie, so no request carries it unless this script adds
// it (nothing for another site to forge), and it is gone when the tab closes.

const TOKEN_KEY = "otaguard.operator-token";
// A token is printable ASCII without spaces (the server's are 43 URL-safe characters);
// anything else cannot go into an Authorization header.
const TOKEN_SHAPE = /^[\x21-\x7e]{1,1024}$/;

/** An API answer other than 2xx: the status and the server's one-line error. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** Keep a token pasted into the login form; throws ApiError for one no server gave out. */
export function keepToken(text) {
  const t = text.trim();
  if (!TOKEN_SHAPE.test(t)) throw new ApiError(0, "that is not an operator token (printable characters, no spaces)");
  sessionStorage.setItem(TOKEN_KEY, t);
}

/** The path with each segment URI-encoded: api(path("devices", serial)). */
export function path(...segments) {
  return "/api/v1/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
}

/** GET (or POST) an operator API path on this server; the JSON answer, or ApiError. */
export async function api(url, { method = "GET" } = {}) {
  let resp;
  try {
    resp = await fetch(url, {
      method,
      headers: { Authorization: `Bearer ${token() || ""}`, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
  } catch (e) {
    throw new ApiError(0, `the server did not answer (${e.message})`);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  if (!resp.ok) {
    const why = body && typeof body.error === "string" ? body.error : `HTTP ${resp.status}`;
    throw new ApiError(resp.status, why);
  }
  return body;
}
