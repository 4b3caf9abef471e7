// Vulnerabilities: the imported advisories with the devices each affects now, and per
// advisory the affected releases, the devices running them and the releases fixing it.
import { api, path } from "./api.js";
import { el, link, long, num, table, when } from "./dom.js";

// Advisories whose affected devices are counted on the list page (one request each).
const MAX_COUNTED = 50;

export async function vulnsView() {
  const vulns = await api(path("vulns"));
  const counted = await Promise.all(vulns.slice(0, MAX_COUNTED).map((v) => api(path("vulns", v.id, "affected"))));
  const rows = vulns.map((v, i) => {
    const found = counted[i];
    return {
      id: v.id,
      cells: [el("a", { href: link("vulns", v.id) }, v.id), long(v.summary), v.aliases.join(", "), long(v.packages.join(" ")),
        found ? num(found.releases.length) : "", found ? num(found.devices.length) : "",
        found ? found.fixed_by.map((f) => f.version).join(", ") : "", when(v.imported_at)],
    };
  });
  return el("div", {},
    el("h2", {}, "Vulnerabilities ", el("span", { class: "muted", id: "vuln-total", "data-count": vulns.length },
      `${vulns.length} imported`)),
    vulns.length > MAX_COUNTED ? el("p", { class: "muted" }, `affected counts for the first ${MAX_COUNTED}; open one for the rest`) : null,
    vulns.length === 0 ? el("p", { class: "muted" }, "None imported (otaguard vuln import FILE).")
      : table("vulns", ["id", "summary", "aliases", "packages", ["releases", "num"], ["devices", "num"], "fixed by", "imported"],
        rows, (row) => ({ "data-vuln": row.id })));
}

export async function vulnView(id) {
  const found = await api(path("vulns", id, "affected"));
  const hit = (h) => ({ cells: [h.version, h.target, `${h.component} ${h.component_version ?? ""}`.trim()] });
  return el("div", { "data-vuln": found.vuln.id },
    el("h2", {}, "Vulnerability ", el("span", { id: "vuln-id" }, found.vuln.id)),
    el("p", { id: "vuln-summary" }, found.vuln.summary),
    el("section", { class: "card" },
      el("h3", {}, "Devices running an affected release ",
        el("span", { class: "muted", id: "affected-count", "data-count": found.devices.length }, `${found.devices.length}`)),
      found.devices.length === 0 ? el("p", { class: "muted" }, "None.")
        : table("affected-devices", ["device", "runs", "since (last check-in)"],
          found.devices.map((d) => ({ serial: d.serial, cells: [el("a", { href: link("device", d.serial) }, d.serial), d.target, when(d.last_checkin)] })),
          (row) => ({ "data-serial": row.serial }))),
    el("section", { class: "card" },
      el("h3", {}, "Affected releases"),
      found.releases.length === 0 ? el("p", { class: "muted" }, "None.")
        : table("affected-releases", ["version", "target", "component"], found.releases.map(hit))),
    el("section", { class: "card" },
      el("h3", {}, "Fixed by"),
      found.fixed_by.length === 0 ? el("p", { class: "muted" }, "No release fixes it yet.")
        : table("fixed-by", ["version", "target", "component"], found.fixed_by.map(hit))));
}
