// Alerts, newest first: what was observed against which threshold, and what was done.
// Acknowledging is offered only to a token whose role allows it (operator or above); the
// API checks the role again and audits the acknowledgement.
import { ApiError, api, path } from "./api.js";
import { badge, el, link, long, num, table, when } from "./dom.js";

// As many as the API lists in one request.
const MAX_ALERTS = 1000;

function subject(a) {
  return a.serial ? el("a", { href: link("device", a.serial) }, a.subject) : a.subject;
}

function state(a) {
  return a.acked_at
    ? el("span", {}, badge("acked"), ` by ${a.acked_by} ${when(a.acked_at)}`)
    : badge("open");
}

export async function alertsView({ canAck, rerender }) {
  const alerts = await api(`${path("alerts")}?all=true&limit=${MAX_ALERTS}`);
  const open = alerts.filter((a) => !a.acked_at).length;
  const error = el("p", { class: "error", role: "alert", id: "alerts-error" });
  const ack = (a) => el("button", {
    type: "button", "data-ack": a.id,
    onclick: async () => {
      try {
        await api(path("alerts", a.id, "ack"), { method: "POST" });
        await rerender();
      } catch (e) {
        error.textContent = `Acknowledging alert ${a.id} failed: ${e instanceof ApiError ? e.message : e}`;
      }
    },
  }, "Acknowledge");
  const headers = ["#", "time", "signal", "subject", "observed", "threshold", "detail", "action", "state"];
  if (canAck) headers.push("");
  const rows = alerts.map((a) => {
    const cells = [num(a.id), when(a.time), a.signal, subject(a), long(a.observed), long(a.threshold), long(a.detail),
      `${a.action}: ${a.outcome}`, state(a)];
    if (canAck) cells.push(a.acked_at ? "" : ack(a));
    return { alert: a, cells };
  });
  return el("div", {},
    el("h2", {}, "Alerts ", el("span", { class: "muted", id: "alert-count", "data-open": open, "data-total": alerts.length },
      `${open} open, ${alerts.length - open} acknowledged`)),
    canAck ? null : el("p", { class: "muted" }, "Acknowledging needs an operator token (this one may only look)."),
    error,
    alerts.length === 0 ? el("p", { class: "muted" }, "No alert.")
      : table("alerts", headers, rows, (row) => ({ "data-alert": row.alert.id, "data-signal": row.alert.signal })));
}
