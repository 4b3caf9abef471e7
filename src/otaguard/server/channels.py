"""Channels and rollouts: what the director tells one device, as a pure function.

:func:`decide` replaces the director's former ``choose_release`` (ADR 0011). Every input
is passed in — the device (its running version, groups, opt-out, operator assignment),
the releases of the newest targets version, the rollouts with their groups' members, the
groups' channel settings, when each release was first seen, and ``now`` — so the rules
below are unit-tested exhaustively (``tests/unit/test_channels.py``):

1. Only releases whose hardware ids include the device's are considered.
2. An operator assignment wins (``hold``: nothing; a version: that one, if newer).
3. In recovery (nothing runs) the newest final release restores the device.
4. **Security channel**: the newest *final* ``security`` release on the device's own
   ``major.minor`` line that is newer than what it runs (2.3.1 for a device on 2.3.0 while
   2.4.0 exists); when its line has none, the newest security release above what it runs
   (a fix must not be withheld because it only exists on a newer line). It goes out
   without a rollout, to feature-opted-out devices too, and ignores maintenance windows;
   only the largest ``security_delay`` among the device's groups (at most
   :data:`MAX_SECURITY_DELAY`) postpones it, counted from when the server first saw it.
5. **Feature channel**: a ``feature`` release — and any pre-release, whatever its type —
   reaches a device only through a rollout whose group holds it and whose current phase
   admits it (:func:`admitted`), while the rollout is ``active`` (or ``completed``), the
   device has not opted out of features (itself or through a group), and the rollout's
   window and every window of the device's groups are open.
6. Of the candidates of 4 and 5, the newest version wins; never one not newer than what
   runs, nor one whose security counter is below the running release's (the device's
   anti-rollback floor would refuse it: 2.4.0 for a device on the fix 2.3.1 when only
   2.4.1 carries that fix).

:func:`evaluate` is the rollout's own step (advance a phase, halt on failures), pure too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from otaguard.model.manifest import printable_text
from otaguard.model.version import Version
from otaguard.server.director import DirectorRelease
from otaguard.server.storage.assignments import Assignment

__all__ = [
    "FAILED_OUTCOMES",
    "MAX_ERROR_CHARS",
    "MAX_PHASES",
    "MAX_SECURITY_DELAY",
    "MAX_WINDOW_CHARS",
    "ROLLOUT_STATES",
    "UP_TO_DATE",
    "WINDOW_PATTERN",
    "Decision",
    "DeviceFacts",
    "Evaluation",
    "GroupPolicy",
    "Rollout",
    "RolloutView",
    "Window",
    "admitted",
    "decide",
    "evaluate",
    "install_outcome",
    "nothing_newer",
    "orphan_releases",
]

#: a group may postpone security releases by at most this: the CRA asks that security
#: fixes go out without delay; a week covers a site's change-freeze, not a forgotten fleet
MAX_SECURITY_DELAY: Final = dt.timedelta(days=7)
#: phases of one rollout: more is not a staged rollout but a drip feed nobody watches
MAX_PHASES: Final = 10
#: ``active`` admits by phase; ``completed`` admits all; the others admit nobody new
ROLLOUT_STATES: Final = ("active", "paused", "halted", "cancelled", "completed")
#: a device's last install result with one of these outcomes counts as a failure
FAILED_OUTCOMES: Final = frozenset({"failed", "rolled-back", "refused"})
#: the reason of a decision that offers nothing and has nothing to explain
UP_TO_DATE: Final = "up to date for its channels"
#: characters of one device's reported error kept in a rollout's status and halt reason:
#: a halt reason names up to ten devices and must fit the store's 4,000 characters
MAX_ERROR_CHARS: Final = 200
#: a maintenance window is a short phrase (``Mon-Fri 02:00-05:00``)
MAX_WINDOW_CHARS: Final = 64

_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW: Final = re.compile(
    r"^(?P<days>[A-Za-z,*-]+)\s+(?P<h1>\d\d):(?P<m1>\d\d)-(?P<h2>\d\d):(?P<m2>\d\d)$"
)
# The whole rule as one pattern (the OpenAPI schema states it; parse checks it first, so
# the two agree): days (Mon..Sun in any case, longer spellings such as Monday, ranges,
# lists, daily or *), then HH:MM-HH:MM with 24:00 as an end. ECMA 262 has no inline
# case flag, hence the letter classes.
_DAY_NAMES: Final = "|".join("".join(f"[{c.upper()}{c}]" for c in d) + "[A-Za-z]*" for d in _DAYS)
_DAY_SPEC: Final = rf"(?:(?:{_DAY_NAMES})(?:-(?:{_DAY_NAMES}))?|[Dd][Aa][Ii][Ll][Yy]|\*)"
_TIME: Final = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
WINDOW_PATTERN: Final = rf"^ *{_DAY_SPEC}(?:,{_DAY_SPEC})* +{_TIME}-(?:{_TIME}|24:00) *$"
_WINDOW_RULE: Final = re.compile(WINDOW_PATTERN)


def _day(text: str) -> int:
    try:
        return _DAYS.index(text.lower()[:3]) if len(text) >= 3 else _DAYS.index(text)
    except ValueError:
        raise ValueError(f"unknown day {text!r} (use Mon..Sun)") from None


@dataclass(frozen=True)
class Window:
    """A weekly maintenance window in UTC: ``Mon-Fri 02:00-05:00``, ``daily 22:00-02:00``.

    Days are ``Mon``..``Sun``, ranges (``Fri-Mon`` wraps) and lists (``Sat,Sun``), or
    ``daily``; a window ending before it starts runs over midnight into the next day.
    """

    text: str
    days: frozenset[int]
    start: int  # minutes after midnight
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        """Parse a window.

        Raises:
            ValueError: not of the form ``DAYS HH:MM-HH:MM``, or an empty window.
        """
        ok = len(text) <= MAX_WINDOW_CHARS and _WINDOW_RULE.fullmatch(text) is not None
        m = _WINDOW.match(text.strip()) if ok else None
        if m is None:
            raise ValueError(f"invalid window {text!r}: expected e.g. 'Mon-Fri 02:00-05:00'")
        days: set[int] = set()
        for part in m["days"].split(","):
            if part.lower() in ("daily", "*"):
                days.update(range(7))
            elif "-" in part:
                a, b = (_day(p) for p in part.split("-", 1))
                days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
            else:
                days.add(_day(part))
        h1, m1, h2, m2 = (int(m[k]) for k in ("h1", "m1", "h2", "m2"))
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"invalid time of day in window {text!r}")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ValueError(f"window {text!r} is empty (start equals end)")
        return cls(" ".join(text.split()), frozenset(days), start, end)

    def contains(self, now: dt.datetime) -> bool:
        """Whether ``now`` (any zone; compared in UTC) falls in the window."""
        t = now.astimezone(dt.UTC)
        minute, day = t.hour * 60 + t.minute, t.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # over midnight: the evening of a listed day, or the morning after one
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )


@dataclass(frozen=True)
class GroupPolicy:
    """A group's channel settings (``otaguard group set``)."""

    name: str
    no_features: bool = False
    security_delay: dt.timedelta = dt.timedelta()
    window: Window | None = None

    def __post_init__(self) -> None:
        if not dt.timedelta() <= self.security_delay <= MAX_SECURITY_DELAY:
            raise ValueError("a security delay is between 0 and 7 days")


@dataclass(frozen=True)
class Rollout:
    """A staged rollout of one release to one group."""

    name: str
    version: Version
    group: str
    phases: tuple[int, ...]
    success_threshold: int
    failure_threshold: int
    window: Window | None = None
    state: str = "active"
    phase: int = 0  # index into phases
    reason: str = ""

    def __post_init__(self) -> None:
        p = self.phases
        if not 1 <= len(p) <= MAX_PHASES:
            raise ValueError(f"a rollout has 1 to {MAX_PHASES} phases")
        if any(not 1 <= x <= 100 for x in p) or list(p) != sorted(set(p)):
            raise ValueError("phases are increasing percentages between 1 and 100")
        if p[-1] != 100:
            raise ValueError("the last phase must be 100 (every member of the group)")
        for t in (self.success_threshold, self.failure_threshold):
            if not 0 <= t <= 100:
                raise ValueError("thresholds are percentages between 0 and 100")
        if self.state not in ROLLOUT_STATES:
            raise ValueError(f"rollout state must be one of {ROLLOUT_STATES}")
        if not 0 <= self.phase < len(p):
            raise ValueError("phase index out of range")

    @property
    def percent(self) -> int:
        """The share of the group admitted now (100 once completed)."""
        return 100 if self.state == "completed" else self.phases[self.phase]


@dataclass(frozen=True)
class RolloutView:
    """A rollout and the serials of its group's members now."""

    rollout: Rollout
    members: tuple[str, ...]


@dataclass(frozen=True)
class DeviceFacts:
    """The device a decision is for."""

    serial: str
    hardware_id: str
    running: Version | None
    groups: tuple[str, ...] = ()
    no_features: bool = False
    assignment: Assignment | None = None


@dataclass(frozen=True)
class Decision:
    """What to install (``None``: nothing) and why, in words for ``fleet show`` and logs."""

    release: DirectorRelease | None
    reason: str


@lru_cache(maxsize=64)
def _order(name: str, members: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(members, key=lambda s: hashlib.sha256(f"{name}\0{s}".encode()).digest()))


def admitted(rollout: Rollout, members: Sequence[str]) -> frozenset[str]:
    """The members the rollout's current phase admits.

    The first ``ceil(percent x members / 100)`` in the order of SHA-256(name, serial):
    deterministic (every server process agrees, a later phase keeps the earlier ones)
    and spread (not the lowest serials, which are often one batch or one site).
    A paused, halted or cancelled rollout still reports whom it had admitted.
    """
    order = _order(rollout.name, tuple(sorted(set(members))))
    return frozenset(order[: math.ceil(len(order) * rollout.percent / 100)])


def _is_feature(r: DirectorRelease) -> bool:
    return r.info.release_type != "security" or bool(r.info.version.prerelease)


def _security(
    device: DeviceFacts,
    running: Version,
    mine: Sequence[DirectorRelease],
    *,
    groups: Mapping[str, GroupPolicy],
    first_seen: Mapping[str, dt.datetime],
    now: dt.datetime,
) -> tuple[DirectorRelease | None, str | None]:
    fixes = [r for r in mine if not _is_feature(r) and r.info.version > running]
    own = [r for r in fixes if (r.info.version.major, r.info.version.minor)
           == (running.major, running.minor)]  # fmt: skip
    delay = max(
        (groups[g].security_delay for g in device.groups if g in groups), default=dt.timedelta()
    )

    def seen(r: DirectorRelease) -> dt.datetime:
        # A concurrent check-in may record the first sighting after this one read its
        # clock: that is a sighting "now", not in the future (else an unpostponed security
        # release would skip this device until its next poll).
        return min(first_seen.get(r.name, now), now)

    # the newest fix whose postponement is over (an older due fix is not held back by a
    # newer one that is still postponed)
    ready = [r for r in own or fixes if seen(r) + delay <= now]
    best = max(ready, key=lambda r: r.info.version, default=None)
    waiting = max(own or fixes, key=lambda r: r.info.version, default=None)
    note = None
    if waiting is not None and waiting is not best:
        until = seen(waiting) + delay
        note = f"security {waiting.info.version} postponed until {until.isoformat()}"
    return best, note


def _windows_open(
    rollout: Rollout, device: DeviceFacts, groups: Mapping[str, GroupPolicy], now: dt.datetime
) -> Window | None:
    """The first closed window (``None``: all open)."""
    windows = [rollout.window, *(groups[g].window for g in device.groups if g in groups)]
    return next((w for w in windows if w is not None and not w.contains(now)), None)


def _from_rollouts(
    device: DeviceFacts,
    running: Version,
    mine: Sequence[DirectorRelease],
    *,
    rollouts: Iterable[RolloutView],
    groups: Mapping[str, GroupPolicy],
    now: dt.datetime,
) -> tuple[list[tuple[DirectorRelease, str]], list[str]]:
    opted_out = device.no_features or any(
        groups[g].no_features for g in device.groups if g in groups
    )
    found: list[tuple[DirectorRelease, str]] = []
    notes: list[str] = []
    for view in rollouts:
        r = view.rollout
        rel = next((x for x in mine if x.info.version == r.version), None)
        if rel is None or rel.info.version <= running or device.serial not in view.members:
            continue
        if r.state not in ("active", "completed"):
            notes.append(f"rollout {r.name} is {r.state}")
        elif device.serial not in admitted(r, view.members):
            notes.append(
                f"not yet admitted to rollout {r.name} (phase {r.phase + 1}: {r.percent}%)"
            )
        elif opted_out and _is_feature(rel):
            notes.append(f"opted out of feature releases (rollout {r.name})")
        elif (closed := _windows_open(r, device, groups, now)) is not None:
            notes.append(f"waiting for maintenance window {closed.text} (rollout {r.name})")
        else:
            found.append((rel, f"rollout {r.name} phase {r.phase + 1}/{len(r.phases)}"))
    return found, notes


def _running_counter(running: Version, mine: Sequence[DirectorRelease]) -> int:
    """The security counter of the release that runs (0 when it is no longer served: the
    device's own floor still guards)."""
    return next((r.info.security_counter for r in mine if r.info.version == running), 0)


def _assigned(a: Assignment, running: Version | None, mine: Sequence[DirectorRelease]) -> Decision:
    if a.mode == "hold":
        return Decision(None, "held by an operator assignment")
    chosen = next((r for r in mine if str(r.info.version) == a.version), None)
    if chosen is None:
        return Decision(None, f"assigned {a.version}, which is not served for this hardware")
    if running is not None and chosen.info.version <= running:
        return Decision(None, f"assigned {a.version}, not newer than what runs")
    if running is not None and chosen.info.security_counter < _running_counter(running, mine):
        return Decision(None, f"assigned {a.version}, below the security counter of what runs")
    return Decision(chosen, f"assigned {a.version} by an operator")


def nothing_newer(
    *, hardware_id: str, running: Version | None, releases: Sequence[DirectorRelease]
) -> bool:
    """Whether no release for ``hardware_id`` is newer than ``running`` (a known version):
    then :func:`decide` answers nothing, with :data:`UP_TO_DATE`, for a device without an
    assignment, whatever its groups, opt-out and rollouts (every rule offers, or explains
    holding back, only a newer release). Most check-ins are such a device's: its policy
    needs no more facts of it."""
    return running is not None and not any(
        hardware_id in r.info.hardware_ids and r.info.version > running for r in releases
    )


def decide(
    *,
    device: DeviceFacts,
    releases: Sequence[DirectorRelease],
    rollouts: Sequence[RolloutView],
    groups: Mapping[str, GroupPolicy],
    first_seen: Mapping[str, dt.datetime],
    now: dt.datetime,
) -> Decision:
    """The release ``device`` should install now (the rules in the module docstring).

    Args:
        device: the device, its groups, opt-out and assignment.
        releases: what the newest targets version lists.
        rollouts: every rollout (any state) with its group's members.
        groups: channel settings of the groups that have any.
        first_seen: when the server first saw each release (by target name); a release
            missing here is taken as first seen ``now``.
        now: the reference time.
    """
    mine = [r for r in releases if device.hardware_id in r.info.hardware_ids]
    running = device.running
    if device.assignment is not None:
        return _assigned(device.assignment, running, mine)
    if nothing_newer(hardware_id=device.hardware_id, running=running, releases=mine):
        return Decision(None, UP_TO_DATE)
    if running is None:
        final = [r for r in mine if not r.info.version.prerelease]
        best = max(final, key=lambda r: r.info.version, default=None)
        return Decision(best, "recovery: the newest release" if best else "recovery: no release")
    # the device's floor refuses a release whose security counter is below what runs
    # (a newer line's release without the fix an older line's release carries): never
    # offer one — the device would refuse it and report a downgrade attempt
    floor = _running_counter(running, mine)
    usable = [r for r in mine if r.info.security_counter >= floor]
    candidates: list[tuple[DirectorRelease, str]] = []
    security, held = _security(
        device, running, usable, groups=groups, first_seen=first_seen, now=now
    )
    if security is not None:
        candidates.append((security, f"security release {security.info.version}"))
    found, notes = _from_rollouts(
        device, running, usable, rollouts=rollouts, groups=groups, now=now
    )
    candidates.extend(found)
    if held is not None:
        notes.insert(0, held)
    notes.extend(
        f"{r.info.version} carries security counter {r.info.security_counter}, below the "
        f"{floor} of what runs"
        for r in mine
        if r.info.security_counter < floor and r.info.version > running
    )
    if not candidates:
        return Decision(None, "; ".join(notes) or UP_TO_DATE)
    return Decision(*max(candidates, key=lambda c: c[0].info.version))


# -- the rollout's own step ---------------------------------------------------------------
def _printable(text: str) -> str:
    """A device's words, safe to store and show: its signed manifest may carry any string
    (a NUL, which PostgreSQL text refuses; a lone surrogate, which UTF-8 cannot encode),
    and a halt must not fail on writing its reason. Manifests are refused such text since
    (``model.manifest``), but older stored ones may still hold it."""
    return printable_text(text, MAX_ERROR_CHARS)


def install_outcome(
    version: Version, *, running: str | None, last_result: Mapping[str, str]
) -> tuple[str, str]:
    """A device's standing in a rollout of ``version``: ``success``, ``failure`` or
    ``pending``, with the error it reported (for ``failure``).

    Success: it runs ``version``. Failure: its last install result is a failed,
    rolled-back or refused install of ``version``.
    """
    if running == str(version):
        return "success", ""
    if last_result.get("version") == str(version) and last_result.get("outcome") in (
        FAILED_OUTCOMES
    ):
        error = _printable(last_result.get("error") or last_result.get("detail") or "")
        return "failure", f"{last_result['outcome']}: {error}".rstrip(": ")
    return "pending", ""


@dataclass(frozen=True)
class Evaluation:
    """A rollout after one evaluation, and the counts it was based on."""

    rollout: Rollout
    admitted: int
    succeeded: int
    failed: dict[str, str] = field(default_factory=dict)  # serial -> reported error
    #: whether the state or phase differs from the rollout evaluated
    changed: bool = False


def _rate(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def evaluate(
    rollout: Rollout, members: Sequence[str], outcomes: Mapping[str, tuple[str, str]]
) -> Evaluation:
    """One step of an ``active`` rollout; other states are returned unchanged.

    Halt when the failures among admitted devices exceed ``failure_threshold`` percent
    of them (checked first: a phase never advances past a failing one); else advance a
    phase (repeatedly, while the next one is met too) when the successes reach
    ``success_threshold`` percent of the admitted devices; the last phase met completes it.

    Args:
        rollout: the rollout.
        members: its group's members now.
        outcomes: per serial, :func:`install_outcome`; a serial missing is pending.
    """
    current, changed = rollout, False
    while True:
        group = admitted(current, members)
        ok = sum(1 for s in group if outcomes.get(s, ("pending", ""))[0] == "success")
        bad = {s: outcomes[s][1] for s in sorted(group) if s in outcomes
               and outcomes[s][0] == "failure"}  # fmt: skip
        if current.state != "active" or not group:
            return Evaluation(current, len(group), ok, bad, changed)
        if _rate(len(bad), len(group)) > current.failure_threshold:
            why = ", ".join(f"{s} ({e})" for s, e in list(bad.items())[:10])
            reason = (
                f"halted in phase {current.phase + 1}: {len(bad)} of {len(group)} admitted "
                f"failed ({_rate(len(bad), len(group)):.0f}% > {current.failure_threshold}%): {why}"
            )
            halted = _replace(current, state="halted", reason=reason)
            return Evaluation(halted, len(group), ok, bad, True)
        if _rate(ok, len(group)) < current.success_threshold:
            return Evaluation(current, len(group), ok, bad, changed)
        if current.phase + 1 == len(current.phases):
            done = _replace(current, state="completed", reason="every phase met its threshold")
            return Evaluation(done, len(group), ok, bad, True)
        current, changed = _replace(current, phase=current.phase + 1, reason=""), True


def _replace(r: Rollout, **changes: Any) -> Rollout:
    return dataclasses.replace(r, **changes)


def orphan_releases(
    releases: Iterable[DirectorRelease], registered_hardware: Iterable[str]
) -> list[tuple[DirectorRelease, tuple[str, ...]]]:
    """Releases naming a hardware id no registered device has (a typo must not vanish).

    Returns each such release with its unknown hardware ids.
    """
    known = set(registered_hardware)
    out = []
    for r in releases:
        unknown = tuple(h for h in r.info.hardware_ids if h not in known)
        if unknown:
            out.append((r, unknown))
    return out
