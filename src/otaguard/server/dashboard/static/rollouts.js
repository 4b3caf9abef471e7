// Rollouts: each with its phases, its counts as the server evaluates them now, and why it
// halted (the failing devices and their errors).
import { api, path } from "./api.js";
import { badge, el, facts, link, long, table } from "./dom.js";

function phaseState(rollout, index) {
  const n = index + 1;
  if (rollout.state === "completed" || n < rollout.phase) return "done";
  if (n === rollout.phase) return "current";
  return "pending";
}

function phases(rollout) {
  return el("ol", { class: "phases", "data-rollout": rollout.name },
    rollout.phases.map((pct, i) => {
      const state = phaseState(rollout, i);
      const cls = state === "current" && rollout.state !== "active" ? `current ${rollout.state}` : state;
      return el("li", { class: cls, "data-phase": i + 1, "data-phase-state": state,
        title: `phase ${i + 1}: ${pct}% of the group (${state})` }, `${i + 1}: ${pct}%`);
    }));
}

function card(r) {
  const failed = r.failed ?? [];
  return el("section", { class: "card rollout", "data-rollout": r.name, "data-state": r.state },
    el("h3", {}, r.name, " ", badge(r.state, { "data-field": "state" })),
    phases(r),
    facts([
      ["release", `${r.release} to group ${r.group}`],
      ["phase", el("span", { "data-field": "phase" }, `${r.phase} of ${r.phases.length} (${r.percent}% admitted)`)],
      ["thresholds", `succeed at ${r.success_threshold}%, halt above ${r.failure_threshold}% failed`],
      ["window", r.window ?? "any time"],
      ["members", el("span", { "data-field": "members" }, String(r.members ?? ""))],
      ["admitted", el("span", { "data-field": "admitted" }, String(r.admitted ?? ""))],
      ["succeeded", el("span", { "data-field": "succeeded" }, String(r.succeeded ?? ""))],
      ["failed", el("span", { "data-field": "failed" }, String(failed.length))],
      ["reason", el("span", { class: "reason", "data-field": "reason" }, r.reason || "")],
    ]),
    failed.length === 0 ? null : table(`failed-${r.name}`, ["device", "error"],
      failed.map((f) => ({ cells: [el("a", { href: link("device", f.serial) }, f.serial), long(f.error)] }))));
}

export async function rolloutsView() {
  const listed = await api(path("rollouts"));
  // Each status is evaluated by the server now (phase, counts, failures).
  const rollouts = await Promise.all(listed.map((r) => api(path("rollouts", r.name))));
  const halted = rollouts.filter((r) => r.state === "halted").length;
  return el("div", {},
    el("h2", {}, "Rollouts ", el("span", { class: "muted", id: "rollout-total", "data-count": rollouts.length },
      `${rollouts.length} rollouts, ${halted} halted`)),
    rollouts.length === 0 ? el("p", { class: "muted" }, "No rollout yet.") : null,
    rollouts.map(card));
}
