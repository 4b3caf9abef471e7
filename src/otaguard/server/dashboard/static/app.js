// The dashboard's entry point: login, navigation, and rendering one view at a time.
import { ApiError, api, forgetToken, keepToken, token } from "./api.js";
import { el } from "./dom.js";
import { alertsView } from "./alerts.js";
import { deviceView } from "./device.js";
import { fleetView } from "./fleet.js";
import { rolloutsView } from "./rollouts.js";
import { vulnView, vulnsView } from "./vulns.js";

const ROLES = ["viewer", "operator", "release-manager", "admin"];

// Routes: "#/name" or "#/name/argument" (the argument URI-encoded).
const ROUTES = {
  fleet: () => fleetView(),
  rollouts: () => rolloutsView(),
  alerts: (_arg, me) => alertsView({ canAck: allows(me.role, "operator"), rerender: render }),
  device: (arg) => deviceView(arg),
  vulns: (arg) => (arg === undefined ? vulnsView() : vulnView(arg)),
};

let me = null; // {name, role} of the token, from /api/v1/operator/whoami
let rendering = 0; // the latest render wins when the hash changes quickly

function allows(role, needed) {
  return ROLES.indexOf(role) >= ROLES.indexOf(needed);
}

function $(id) {
  return document.getElementById(id);
}

function showLogin(message) {
  me = null;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("logout").hidden = true;
  $("view").replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
  $("token").focus();
}

async function identify() {
  me = await api("/api/v1/operator/whoami");
  $("login").hidden = true;
  $("login-error").textContent = "";
  $("nav").hidden = false;
  $("who").hidden = false;
  $("who").textContent = `${me.name} (${me.role})`;
  $("who").dataset.role = me.role;
  $("logout").hidden = false;
}

async function login(event) {
  event.preventDefault();
  try {
    keepToken($("token").value);
    $("token").value = "";
    await identify();
  } catch (e) {
    forgetToken();
    // One line: the server's own reason (e.g. "operator token missing or wrong").
    showLogin(`Login refused: ${e instanceof ApiError ? e.message : String(e)}`);
    return;
  }
  if (!location.hash || location.hash === "#") location.hash = "#/fleet";
  else await render();
}

function logout() {
  forgetToken();
  showLogin("Logged out.");
}

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const name = parts[0] || "fleet";
  const arg = parts.length > 1 ? decodeURIComponent(parts.slice(1).join("/")) : undefined;
  return [name, arg];
}

async function render() {
  if (me === null) return;
  const ticket = ++rendering;
  const [name, arg] = parseHash();
  const view = $("view");
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("current", a.dataset.nav === (name === "device" ? "fleet" : name));
  }
  view.dataset.ready = "";
  view.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  const route = ROUTES[name];
  let content;
  try {
    if (route === undefined) throw new ApiError(404, `no page ${name}`);
    content = await route(arg, me);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      forgetToken();
      showLogin(`Logged out: ${e.message}`);
      return;
    }
    content = el("p", { class: "error", role: "alert" }, e instanceof ApiError ? e.message : String(e));
  }
  if (ticket !== rendering) return;
  view.replaceChildren(content);
  view.dataset.ready = name; // tests wait for this
}

async function start() {
  $("login").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", render);
  if (token() === null) {
    showLogin("");
    return;
  }
  try {
    await identify();
  } catch (e) {
    forgetToken();
    showLogin(`Login refused: ${e instanceof ApiError ? e.message : String(e)}`);
    return;
  }
  await render();
}

start();
