// One device's history: registry facts, check-ins with the install result each reported,
// telemetry reports, and its check-in alerts.
import { api, path } from "./api.js";
import { badge, el, facts, long, num, table, when } from "./dom.js";

// Telemetry reports read (the API returns at most 100).
const TELEMETRY_LIMIT = 20;

function installResults(checkins) {
  // Oldest first: each distinct result the device reported, from when it first did.
  const seen = [];
  for (const c of [...checkins].reverse()) {
    if (c.detail && (seen.length === 0 || seen[seen.length - 1].detail !== c.detail)) seen.push(c);
  }
  return seen.reverse();
}

function lastInstall(report) {
  const li = report.last_install;
  if (!li || typeof li !== "object") return "";
  return `${li.result} ${li.version ?? ""} ${li.duration_s != null ? `(${li.duration_s} s)` : ""}`.trim();
}

export async function deviceView(serial) {
  if (!serial) throw new Error("no device named: open one from the fleet's list");
  const [device, history, telemetry] = await Promise.all([
    api(path("devices", serial)),
    api(path("devices", serial, "checkins")),
    api(`${path("devices", serial, "telemetry")}?limit=${TELEMETRY_LIMIT}`),
  ]);
  const tags = Object.entries(device.tags).map(([k, v]) => `${k}=${v}`).join(", ");
  const results = installResults(history.checkins);
  return el("div", { "data-device": device.serial },
    el("h2", {}, "Device ", el("span", { id: "device-serial" }, device.serial), " ", badge(device.status)),
    el("section", { class: "card" }, facts([
      ["hardware id", el("span", { id: "device-hardware" }, device.hardware_id)],
      ["status", device.status],
      ["reason", el("span", { id: "device-reason", class: "reason" }, device.reason)],
      ["running", device.running_version ?? ""],
      ["last check-in", `${when(device.last_checkin)} ${device.last_outcome ?? ""}`],
      ["last result", el("span", { id: "device-last-result" }, device.last_result ?? "")],
      ["groups", device.groups.join(", ")],
      ["tags", tags],
      ["attestation key", history.attestation_key ? "registered" : "none"],
      ["certificates", device.cert_serials.join(", ")],
    ])),
    el("section", { class: "card" },
      el("h3", {}, "Check-ins ", el("span", { class: "muted", id: "checkin-count", "data-count": history.checkins.length },
        `${history.checkins.length} latest, newest first`)),
      table("checkins", ["time", "device time", "running", "boot sha256", "attested", "outcome", "install result / detail"],
        history.checkins.map((c) => ({ cells: [when(c.time), c.device_time, c.running_version,
          c.boot_sha256.slice(0, 16) + "…", c.attested ? "yes" : "no", badge(c.outcome), long(c.detail)] })))),
    el("section", { class: "card" },
      el("h3", {}, "Install results"),
      results.length === 0 ? el("p", { class: "muted" }, "None reported.")
        : table("install-results", ["first reported", "result"], results.map((c) => ({ cells: [when(c.time), long(c.detail)] })))),
    el("section", { class: "card" },
      el("h3", {}, "Telemetry ", el("span", { class: "muted", id: "telemetry-count", "data-count": telemetry.length },
        `${telemetry.length} latest reports`)),
      telemetry.length === 0 ? el("p", { class: "muted" }, "No report.")
        : table("telemetry", ["received", "via", "running", ["uptime s", "num"], ["boots", "num"], ["rollbacks", "num"],
          ["agent errors", "num"], ["free bytes", "num"], "last install", "attestation", ["refused attacks", "num"]],
        telemetry.map((t) => ({ cells: [when(t.time), t.transport, t.report.running_version, num(t.report.uptime_s),
          num(t.report.boot_count), num(t.report.rollbacks), num(t.report.agent_errors), num(t.report.free_storage_bytes),
          lastInstall(t.report), t.report.attestation, num(t.report.refused_attacks)] })))),
    el("section", { class: "card" },
      el("h3", {}, "Check-in alerts"),
      history.alerts.length === 0 ? el("p", { class: "muted" }, "None.")
        : table("device-alerts", ["time", "kind", "detail"],
          history.alerts.map((a) => ({ cells: [when(a.time), a.kind, long(a.detail)] })))));
}
