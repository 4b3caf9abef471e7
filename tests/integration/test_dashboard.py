"""The operator dashboard in Debian's headless Chromium against a real server.

One server with a director and a small real fleet for the module: four gateways
(enrolled, mutual TLS, signed check-ins) and two registered sensors; a rollout of an
image failing its health check that halts by itself when its first admitted device rolls
back, a completed one; a cloned credential quarantined with an alert; an imported OSV
advisory. Hostile text comes in where it really can: a compromised device's install
error in its signed manifest, an operator's quarantine reason, an advisory's summary, an
alert's text. The browser logs in with viewer and operator tokens through the login form
and every number it shows is compared with what the operator API returns.

Screenshots go to ``test-artefacts/dashboard/`` (or ``$OTAGUARD_ARTEFACTS/dashboard``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3

from browser_support import ARTEFACTS, PAGE_TIMEOUT, require_chromium, start_chromium
from conftest import HW, World, start_world
from otaguard.agent import Device
from otaguard.agent.install import InstallState
from otaguard.fleet.anomaly import Finding
from otaguard.model.version import Version
from otaguard.server.channels import Rollout, admitted
from otaguard.server.dashboard import DASHBOARD_CSP
from otaguard.sim import make_image

#: markup that runs script if a page ever parses it as HTML
XSS_DEVICE = "<img src=x onerror=\"window.__xss='device'\">"
XSS_REASON = "<script>window.__xss='reason'</script>"
XSS_ALERT = "<img src=x onerror=\"window.__xss='alert'\">"
XSS_VULN = "<img src=x onerror=\"window.__xss='vuln'\">"
SENSOR_HW = "sensor-v2"
VULN_ID = "OSV-2026-DASH"
NO_CHECKIN = "(no check-in yet)"


@dataclass
class Fleet:
    """The module's server, fleet, tokens and browser."""

    world: World
    viewer: str
    operator: str
    history: str  # a device with check-ins, telemetry and a rolled-back install
    cloned: str
    hostile: str
    browser: Any = None
    shots: list[Path] = field(default_factory=list)

    @property
    def http(self) -> urllib3.PoolManager:
        """The test's own HTTPS client (trusting the server's CA), one for the module."""
        if not hasattr(self, "_http"):
            self._http = urllib3.PoolManager(ca_certs=str(self.world.server.ca_cert),
                                             retries=False)  # fmt: skip
        return self._http

    def api(self, path: str, *, token: str | None = None, method: str = "GET",
            body: Any = None) -> Any:  # fmt: skip
        http = self.http
        headers = {"Authorization": f"Bearer {token or self.world.server.operator_token}"}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        resp = http.request(method, self.world.server.base_url + path, headers=headers, body=data)
        assert resp.status < 300, (path, resp.status, resp.data)
        return json.loads(resp.data)

    # -- the browser ---------------------------------------------------------------------
    def url(self, fragment: str = "") -> str:
        return f"{self.world.server.base_url}/dashboard/{fragment}"

    def console_errors(self) -> list[str]:
        """Errors the page logged since the last call (uncaught exceptions, CSP
        violations, failed loads, console.error)."""
        return [e["message"] for e in self.browser.get_log("browser") if e["level"] == "SEVERE"]

    def log_out(self) -> None:
        """A fresh tab (sessionStorage is per tab: no token in it); the old one closed."""
        old = self.browser.current_window_handle
        self.browser.switch_to.new_window("tab")
        new = self.browser.current_window_handle
        self.browser.switch_to.window(old)
        self.browser.close()
        self.browser.switch_to.window(new)

    def log_in(self, token: str) -> None:
        """Through the form, as a person would: paste the token, press the button."""
        from selenium.webdriver.common.by import By

        self.log_out()
        self.browser.get(self.url())
        self.wait_css("form#login:not([hidden])")
        self.browser.find_element(By.ID, "token").send_keys(token)
        self.browser.find_element(By.CSS_SELECTOR, "form#login button[type=submit]").click()
        self.wait_css('#view[data-ready="fleet"]')

    def show(self, fragment: str, view: str) -> None:
        """Open ``#/...`` and wait until the view has drawn its data."""
        self.browser.get(self.url(fragment))
        self.wait_css(f'#view[data-ready="{view}"]')

    def wait_css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.browser, PAGE_TIMEOUT).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, selector))
        )

    def css(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.browser.find_elements(By.CSS_SELECTOR, selector))

    def text(self, selector: str) -> str:
        """textContent (exactly as put in the page, not as laid out)."""
        (node,) = self.css(selector)
        return str(node.get_property("textContent"))

    def shot(self, name: str) -> None:
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTEFACTS / f"{name}.png"
        # the whole page, not only the window
        height = self.browser.execute_script("return document.documentElement.scrollHeight")
        self.browser.set_window_size(1280, max(1000, min(int(height) + 40, 6000)))
        assert self.browser.save_screenshot(str(path)), path
        self.browser.set_window_size(1280, 1000)
        self.shots.append(path)


def _round(devs: list[Device]) -> None:
    for d in devs:
        d.update()


def _build(w: World) -> Fleet:
    f = Fleet(w, viewer="", operator="", history="", cloned="", hostile="")
    gateways = [w.device(f"gw{i}") for i in range(4)]
    for d in gateways:
        d.checkin()
    for s in ("sensor0", "sensor1"):
        f.api("/api/v1/devices", method="POST", body={"serial": s, "hardware_id": SENSOR_HW})
    f.viewer = f.api("/api/v1/operators", method="POST",
                     body={"name": "watcher", "role": "viewer"})["token"]  # fmt: skip
    f.operator = f.api("/api/v1/operators", method="POST",
                       body={"name": "oncall", "role": "operator"})["token"]  # fmt: skip
    serials = [d.config.serial for d in gateways]
    f.api("/api/v1/groups", method="POST", body={"name": "gateways"})
    f.api("/api/v1/groups/gateways/members", method="POST", body={"add": serials})

    # A completed rollout (every gateway already runs 1.0.0), then one of an image that
    # fails its health check: the first admitted gateway installs it, rolls back, reports.
    f.api("/api/v1/rollouts", method="POST", body={
        "name": "r-done", "release": "1.0.0", "group": "gateways", "phases": [50, 100],
        "success_threshold": 95, "failure_threshold": 5,
    })  # fmt: skip
    w.images["1.1.0"] = make_image(w.tmp / "fw-1.1.0.img", size=256 * 1024, seed="1.1.0",
                                   unhealthy=True)  # fmt: skip
    w.release("1.1.0")
    phases = (25, 50, 100)
    f.api("/api/v1/rollouts", method="POST", body={
        "name": "r-halt", "release": "1.1.0", "group": "gateways", "phases": list(phases),
        "success_threshold": 95, "failure_threshold": 5,
    })  # fmt: skip
    first = admitted(Rollout("r-halt", Version.parse("1.1.0"), "gateways", phases, 95, 5), serials)
    (history,) = [d for d in gateways if d.config.serial in first]
    history.update()  # installs, fails its health check, rolls back
    history.checkin()  # reports it: the rollout halts
    history.send_telemetry()
    history.send_telemetry()
    assert f.api("/api/v1/rollouts/r-halt")["state"] == "halted"
    others = [d for d in gateways if d is not history]

    # A compromised gateway reports an install error made of markup in its signed manifest.
    hostile = others[0]
    state = InstallState.load(hostile.paths.install_state)
    state.last_result = {"outcome": "failed", "version": "0.9.0", "error": XSS_DEVICE}
    state.save(hostile.paths.install_state)
    hostile.checkin()

    # A real clone of another gateway's credentials: quarantined, with an alert.
    cloned = others[1]
    cloned.send_telemetry()
    twin = Device(shutil.copytree(cloned.paths.root, w.tmp / "twin"))
    twin.boot()
    twin.send_telemetry()
    cloned.send_telemetry()

    # An operator's quarantine reason, an alert's text and an advisory made of markup.
    f.api("/api/v1/devices/sensor1/quarantine", method="POST", body={"reason": XSS_REASON})
    monitor = w.server.app.state.monitoring.monitor
    monitor.raise_finding(Finding(
        signal="attack-flags", subject=f"device:{hostile.config.serial}", observed=XSS_ALERT,
        threshold="no attack flag in a signed manifest", detail=f"refused: {XSS_ALERT}",
        serial=hostile.config.serial,
    ))  # fmt: skip
    f.api("/api/v1/vulns", method="POST", body={
        "schema_version": "1.6.0", "id": VULN_ID, "modified": "2026-11-20T00:00:00Z",
        "summary": f"OpenSSL over-read {XSS_VULN}", "aliases": ["CVE-2024-5535"],
        "affected": [{"package": {"purl": "pkg:generic/openssl"}, "ranges": [
            {"type": "SEMVER", "events": [{"introduced": "3.0.0"}, {"fixed": "3.0.14"}]}]}],
    })  # fmt: skip
    f.history, f.cloned, f.hostile = (
        history.config.serial,
        cloned.config.serial,
        hostile.config.serial,
    )
    return f


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_chromium()
    tmp = tmp_path_factory.mktemp("dashboard")
    w = start_world(tmp, director=True, rollout_interval=0.2)
    try:
        w.release("1.0.0")
        f = _build(w)
        f.browser = start_chromium(w.server.base_url, tmp / "chromium-profile")
        try:
            yield f
        finally:
            f.browser.quit()
            f.http.clear()
            print(f"\ndashboard screenshots in {ARTEFACTS}: {', '.join(p.name for p in f.shots)}")
    finally:
        w.server.stop()


def _counts(rows: list[Any]) -> dict[str, int]:
    return {r.get_attribute("data-key"): int(r.find_elements("tag name", "td")[1].text)
            for r in rows}  # fmt: skip


def test_a_wrong_token_is_refused_in_one_line_and_kept_nowhere(fleet: Fleet) -> None:
    from selenium.webdriver.common.by import By

    fleet.log_out()
    fleet.browser.get(fleet.url())
    fleet.wait_css("form#login:not([hidden])")
    assert fleet.css("#nav")[0].get_attribute("hidden") is not None
    fleet.browser.find_element(By.ID, "token").send_keys("not-a-token-of-this-server-at-all")
    fleet.browser.find_element(By.CSS_SELECTOR, "form#login button[type=submit]").click()
    error = fleet.wait_css("#login-error:not(:empty)")
    assert error.text == "Login refused: operator token missing or wrong"
    assert "\n" not in error.text
    assert fleet.browser.execute_script("return sessionStorage.length") == 0
    assert fleet.css("#nav")[0].get_attribute("hidden") is not None
    assert fleet.text("#view") == ""
    fleet.shot("login-refused")
    # the browser's own record of the 401 is the only error
    errors = fleet.console_errors()
    assert all("401" in e for e in errors) and len(errors) == 1, errors


def test_fleet_counts_equal_the_api(fleet: Fleet) -> None:
    fleet.log_in(fleet.viewer)
    assert fleet.text("#who") == "watcher (viewer)"
    devices = fleet.api("/api/v1/devices", token=fleet.viewer)
    assert len(devices) == 6
    by_version = Counter(d["running_version"] or NO_CHECKIN for d in devices)
    assert by_version == {"1.0.0": 4, NO_CHECKIN: 2}  # the rollback left gw on 1.0.0
    assert _counts(fleet.css("#by-version tbody tr")) == by_version
    assert _counts(fleet.css("#by-hardware tbody tr")) == Counter(d["hardware_id"] for d in devices)
    assert _counts(fleet.css("#by-hardware tbody tr")) == {HW: 4, SENSOR_HW: 2}
    assert _counts(fleet.css("#by-status tbody tr")) == Counter(d["status"] for d in devices)
    assert _counts(fleet.css("#by-hardware-version tbody tr")) == Counter(
        f"{d['hardware_id']} @ {d['running_version'] or NO_CHECKIN}" for d in devices
    )
    assert fleet.css("#fleet-total")[0].get_attribute("data-count") == "6"
    listed = [r.get_attribute("data-serial") for r in fleet.css("#devices tbody tr")]
    assert listed == [d["serial"] for d in devices]
    fleet.shot("fleet")
    assert fleet.console_errors() == []


def test_rollouts_show_the_apis_phases_and_halt_reason(fleet: Fleet) -> None:
    fleet.log_in(fleet.viewer)
    fleet.show("#/rollouts", "rollouts")
    names = [r["name"] for r in fleet.api("/api/v1/rollouts", token=fleet.viewer)]
    assert sorted(names) == ["r-done", "r-halt"]
    for name in names:
        r = fleet.api(f"/api/v1/rollouts/{name}", token=fleet.viewer)
        card = f'section.rollout[data-rollout="{name}"]'
        assert fleet.css(card)[0].get_attribute("data-state") == r["state"]
        states = [li.get_attribute("data-phase-state") for li in fleet.css(f"{card} ol.phases li")]
        want = ["done" if r["state"] == "completed" or i + 1 < r["phase"]
                else "current" if i + 1 == r["phase"] else "pending"
                for i in range(len(r["phases"]))]  # fmt: skip
        assert states == want
        assert fleet.text(f'{card} [data-field="reason"]') == r["reason"]
        for key in ("members", "admitted", "succeeded"):
            assert fleet.text(f'{card} [data-field="{key}"]') == str(r[key])
        assert fleet.text(f'{card} [data-field="failed"]') == str(len(r["failed"]))
    halted = fleet.api("/api/v1/rollouts/r-halt", token=fleet.viewer)
    assert (halted["state"], halted["phase"]) == ("halted", 1)
    assert f"{fleet.history} (rolled-back" in halted["reason"]
    assert fleet.css('[data-rollout="r-halt"] ol.phases li')[0].text == "1: 25%"
    fleet.shot("rollouts")
    assert fleet.console_errors() == []


def test_alerts_counted_as_the_api_and_ack_only_for_an_operator(fleet: Fleet) -> None:
    fleet.log_in(fleet.viewer)
    fleet.show("#/alerts", "alerts")
    every = fleet.api("/api/v1/alerts?all=true", token=fleet.viewer)
    opened = fleet.api("/api/v1/alerts", token=fleet.viewer)
    assert {a["signal"] for a in opened} == {"cloned-credentials", "attack-flags"}
    count = fleet.css("#alert-count")[0]
    assert (count.get_attribute("data-open"), count.get_attribute("data-total")) == (
        str(len(opened)), str(len(every)),
    )  # fmt: skip
    assert [int(r.get_attribute("data-alert")) for r in fleet.css("#alerts tbody tr")] == [
        a["id"] for a in every
    ]
    assert fleet.css("button[data-ack]") == [], "a viewer is offered no acknowledgement"
    fleet.shot("alerts-viewer")
    assert fleet.console_errors() == []

    # An operator acknowledges the cloned-credentials alert by its button.
    fleet.log_in(fleet.operator)
    fleet.show("#/alerts", "alerts")
    buttons = fleet.css("button[data-ack]")
    assert len(buttons) == len(opened)
    (clone_alert,) = [a for a in opened if a["signal"] == "cloned-credentials"]
    fleet.css(f'button[data-ack="{clone_alert["id"]}"]')[0].click()
    fleet.wait_css(f'[data-alert="{clone_alert["id"]}"] .state-acked')
    fleet.wait_css('#view[data-ready="alerts"]')
    acked = [a for a in fleet.api("/api/v1/alerts?all=true") if a["id"] == clone_alert["id"]]
    assert acked[0]["acked_by"] == "oncall"
    count = fleet.css("#alert-count")[0]
    assert count.get_attribute("data-open") == str(len(fleet.api("/api/v1/alerts")))
    fleet.shot("alerts-operator")
    assert fleet.console_errors() == []


def test_a_devices_history_as_the_api_has_it(fleet: Fleet) -> None:
    fleet.log_in(fleet.viewer)
    # from the fleet's list, by its link
    fleet.css(f'#devices tr[data-serial="{fleet.history}"] a')[0].click()
    fleet.wait_css(f'#view[data-ready="device"] [data-device="{fleet.history}"]')
    history = fleet.api(f"/api/v1/devices/{fleet.history}/checkins", token=fleet.viewer)
    telemetry = fleet.api(f"/api/v1/devices/{fleet.history}/telemetry", token=fleet.viewer)
    assert len(history["checkins"]) >= 3
    count = fleet.css("#checkin-count")[0].get_attribute("data-count")
    assert int(count) == len(history["checkins"]) == len(fleet.css("#checkins tbody tr"))
    assert int(fleet.css("#telemetry-count")[0].get_attribute("data-count")) == len(telemetry) == 2
    results = [
        r.find_elements("tag name", "td")[1].text for r in fleet.css("#install-results tbody tr")
    ]
    assert results and "outcome=rolled-back" in results[0] and "version=1.1.0" in results[0]
    assert results[0] == history["checkins"][0]["detail"]
    fleet.shot("device")
    assert fleet.console_errors() == []


def test_affected_devices_per_vulnerability_as_the_api_has_them(fleet: Fleet) -> None:
    fleet.log_in(fleet.viewer)
    fleet.show("#/vulns", "vulns")
    found = fleet.api(f"/api/v1/vulns/{VULN_ID}/affected", token=fleet.viewer)
    assert len(found["devices"]) == 4  # every gateway boots 1.0.0 (OpenSSL 3.0.13)
    row = f'#vulns tr[data-vuln="{VULN_ID}"] td'
    cells = [c.text for c in fleet.css(row)]
    assert cells[4:6] == [str(len(found["releases"])), str(len(found["devices"]))]
    assert cells[6] == "1.1.0"  # its OpenSSL 3.0.15 fixes it
    fleet.shot("vulns")
    fleet.css(f'#vulns tr[data-vuln="{VULN_ID}"] a')[0].click()
    fleet.wait_css(f'#view[data-ready="vulns"] [data-vuln="{VULN_ID}"]')
    listed = sorted(r.get_attribute("data-serial") for r in fleet.css("#affected-devices tbody tr"))
    assert listed == sorted(d["serial"] for d in found["devices"])
    assert fleet.css("#affected-count")[0].get_attribute("data-count") == "4"
    fleet.shot("vuln")
    assert fleet.console_errors() == []


def test_markup_from_the_api_is_shown_as_text_and_never_runs(fleet: Fleet) -> None:
    fleet.log_in(fleet.operator)
    assert fleet.css(f'#devices tr[data-serial="{fleet.hostile}"]')
    cells = fleet.css(f'#devices tr[data-serial="{fleet.hostile}"] td')
    assert (
        cells[-1].get_property("textContent") == f"error={XSS_DEVICE} outcome=failed version=0.9.0"
    )
    sensor = fleet.css('#devices tr[data-serial="sensor1"] td')
    assert sensor[-1].get_property("textContent") == XSS_REASON
    fleet.shot("xss-fleet")
    fleet.show(f"#/device/{fleet.hostile}", "device")
    assert fleet.text("#device-last-result") == f"error={XSS_DEVICE} outcome=failed version=0.9.0"
    fleet.show("#/device/sensor1", "device")
    assert fleet.text("#device-reason") == XSS_REASON
    fleet.show("#/alerts", "alerts")
    row = '#alerts tr[data-signal="attack-flags"] td'
    texts = [c.get_property("textContent") for c in fleet.css(row)]
    assert XSS_ALERT in texts and f"refused: {XSS_ALERT}" in texts
    fleet.shot("xss-alerts")
    fleet.show(f"#/vulns/{VULN_ID}", "vulns")
    assert fleet.text("#vuln-summary") == f"OpenSSL over-read {XSS_VULN}"
    # Nothing ran, and nothing became an element: no <img>, no <script> in the views.
    assert fleet.browser.execute_script("return window.__xss === undefined")
    for view in ("#/fleet", "#/alerts", f"#/device/{fleet.hostile}", f"#/vulns/{VULN_ID}"):
        fleet.show(view, view.split("/")[1])
        assert fleet.css("#view img, #view script") == []
        assert fleet.browser.execute_script("return window.__xss === undefined")
    assert fleet.console_errors() == []


def test_the_pages_policy_refuses_inline_script_and_html_sinks(fleet: Fleet) -> None:
    from selenium.common.exceptions import JavascriptException

    http = fleet.http
    for path in ("/dashboard/", "/dashboard/app.js", "/dashboard/style.css"):
        resp = http.request("GET", fleet.world.server.base_url + path)  # no token needed
        assert resp.status == 200, path
        assert resp.headers["Content-Security-Policy"] == DASHBOARD_CSP
        assert "default-src 'self'" in DASHBOARD_CSP and "unsafe" not in DASHBOARD_CSP
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
    assert (
        http.request("GET", fleet.world.server.base_url + "/dashboard/")
        .headers["Content-Type"]
        .startswith("text/html")
    )
    # No data in the page: its API calls need the token, the page itself none.
    assert b"<script>" not in http.request("GET", fleet.world.server.base_url + "/dashboard/").data
    bare = http.request("GET", fleet.world.server.base_url + "/dashboard", redirect=False)
    assert bare.status in (307, 308) and bare.headers["Location"].endswith("/dashboard/")
    for method in ("POST", "PUT", "DELETE"):
        assert http.request(method, fleet.world.server.base_url + "/dashboard/").status == 405
    assert http.request("GET", fleet.world.server.base_url + "/dashboard/nope.js").status == 404
    assert http.request("GET", fleet.world.server.base_url + "/dashboard/..%2Fapp.py").status in (
        404, 422,
    )  # fmt: skip

    fleet.log_in(fleet.viewer)
    assert fleet.console_errors() == []
    # Markup handed to the HTML sinks: Trusted Types make the browser throw, whatever
    # the string (innerHTML, an inline event handler set as an attribute).
    with pytest.raises(JavascriptException, match="TrustedHTML"):
        fleet.browser.execute_script("document.getElementById('view').innerHTML = '<b>x</b>'")
    with pytest.raises(JavascriptException, match="TrustedScript"):
        fleet.browser.execute_script(
            "document.body.append(document.createElement('img'));"
            "document.querySelector('body > img').setAttribute('onerror', 'window.__csp = 1')"
        )
    assert fleet.browser.execute_script("return window.__csp === undefined")
    # Script and connections from another origin: refused by script-src and connect-src.
    elsewhere = "https://127.0.0.2:9"
    outcome = fleet.browser.execute_script(
        f"return Promise.allSettled([import('{elsewhere}/x.js'), fetch('{elsewhere}/')])"
        ".then(r => r.map(x => x.status))"
    )
    assert outcome == ["rejected", "rejected"]
    errors = fleet.console_errors()
    assert any("Content Security Policy" in e and "script-src" in e for e in errors), errors
    assert any("Content Security Policy" in e and "connect-src" in e for e in errors), errors


def test_openapi_names_the_dashboard_and_whoami(fleet: Fleet) -> None:
    http = fleet.http
    schema = json.loads(http.request("GET", fleet.world.server.base_url + "/openapi.json").data)
    assert set(schema["paths"]["/dashboard/"]) == {"get"}
    assert set(schema["paths"]["/dashboard/{asset}"]) == {"get"}
    assert "text/html" in schema["paths"]["/dashboard/"]["get"]["responses"]["200"]["content"]
    whoami = schema["paths"]["/api/v1/operator/whoami"]["get"]
    assert whoami["x-required-role"] == "viewer"
    assert fleet.api("/api/v1/operator/whoami", token=fleet.viewer) == {
        "name": "watcher", "role": "viewer",
    }  # fmt: skip
    assert fleet.api("/api/v1/operator/whoami") == {"name": "bootstrap", "role": "admin"}
    resp = http.request("GET", fleet.world.server.base_url + "/api/v1/operator/whoami",
                        headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert resp.status == 401
