// The fleet: devices by running version, by hardware id and by status, and the list.
import { api, path } from "./api.js";
import { badge, countBy, el, link, long, num, table, when } from "./dom.js";

// Rows of the device list drawn at once; the filter narrows the rest down.
const MAX_LISTED = 500;
const NO_CHECKIN = "(no check-in yet)";

function counts(id, title, pairs, total) {
  return el("section", { class: "card" },
    el("h3", {}, title),
    table(id, ["", ["devices", "num"], ["share", "num"]],
      pairs.map(([key, n]) => ({ key, cells: [key, num(n), num(`${Math.round((100 * n) / total)}%`)] })),
      (row) => ({ "data-key": row.key })));
}

function deviceRows(devices) {
  return devices.map((d) => ({
    serial: d.serial,
    cells: [
      el("a", { href: link("device", d.serial) }, d.serial),
      d.hardware_id,
      badge(d.status),
      d.running_version ?? "",
      when(d.last_checkin),
      long(d.reason || d.last_result || ""),
    ],
  }));
}

function deviceList(devices) {
  const headers = ["serial", "hardware id", "status", "running", "last check-in", "last result / reason"];
  const listed = el("div", {});
  const note = el("p", { class: "muted" });
  const draw = (filter) => {
    const chosen = devices.filter((d) => d.serial.includes(filter) || d.hardware_id.includes(filter));
    note.textContent = chosen.length > MAX_LISTED
      ? `the first ${MAX_LISTED} of ${chosen.length} devices; filter to narrow down`
      : `${chosen.length} devices`;
    listed.replaceChildren(table("devices", headers, deviceRows(chosen.slice(0, MAX_LISTED)),
      (row) => ({ "data-serial": row.serial })));
  };
  const input = el("input", { class: "filter", type: "search", title: "serial or hardware id contains" });
  input.placeholder = "filter: serial or hardware id";
  input.addEventListener("input", () => draw(input.value.trim()));
  draw("");
  return el("section", { class: "card" }, el("h3", {}, "Devices"), input, note, listed);
}

export async function fleetView() {
  const devices = await api(path("devices"));
  const total = Math.max(devices.length, 1);
  const matrix = countBy(devices, (d) => `${d.hardware_id} @ ${d.running_version ?? NO_CHECKIN}`);
  return el("div", {},
    el("h2", {}, "Fleet ", el("span", { class: "muted", id: "fleet-total", "data-count": devices.length },
      `${devices.length} devices`)),
    el("div", { class: "grid" },
      counts("by-version", "By running version", countBy(devices, (d) => d.running_version ?? NO_CHECKIN), total),
      counts("by-hardware", "By hardware id", countBy(devices, (d) => d.hardware_id), total),
      counts("by-status", "By status", countBy(devices, (d) => d.status), total),
      counts("by-hardware-version", "By hardware id and version", matrix, total)),
    deviceList(devices));
}
