"""The channel and rollout policy at work: stores in, :func:`~.channels.decide` out.

:class:`ChannelPolicy` is the director's :class:`~.director.Policy` on the server: at each
check-in it gathers the device's groups, opt-out and assignment, the rollouts with their
members and the groups' settings, and asks the pure :func:`~.channels.decide`.
:class:`Rollouts` creates, pauses, resumes and cancels rollouts, and evaluates them
(:func:`~.channels.evaluate`) from what the devices' last signed manifests say (a few
set-based queries, whatever the group's size): at the check-in of a device that reports
a failed install of a rollout's release, and in
:class:`RolloutEvaluator`, a periodic task (a device that never checks in again must not
keep a rollout from halting or advancing, and a phase also advances while nobody
reports). The periodic task also flags releases whose hardware id no registered device
has (log WARNING; ``otaguard release check`` lists them).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from threading import Lock
from typing import Final

from otaguard.model.errors import (
    ConflictError,
    StateConflictError,
    VerificationError,
)
from otaguard.model.manifest import DeviceManifest, printable_text
from otaguard.model.version import Version
from otaguard.server._periodic import PeriodicTask
from otaguard.server.channels import (
    UP_TO_DATE,
    Decision,
    DeviceFacts,
    Evaluation,
    Rollout,
    RolloutView,
    admitted,
    decide,
    evaluate,
    install_outcome,
    nothing_newer,
    orphan_releases,
)
from otaguard.server.director import DirectorRelease
from otaguard.server.inventory import Inventory
from otaguard.server.storage.assignments import Assignment
from otaguard.server.storage.base import CheckinRecord
from otaguard.server.storage.rollouts import RolloutStore

__all__ = [
    "ROLLOUT_EVALUATION_INTERVAL",
    "ChannelPolicy",
    "RolloutEvaluator",
    "RolloutStatus",
    "Rollouts",
]

logger = logging.getLogger(__name__)

#: seconds between evaluations of every active rollout by the periodic task: a phase
#: advances (or halts) at most this long after the last report that decides it
ROLLOUT_EVALUATION_INTERVAL: Final = 5.0
#: what a manifest's last_result may hold (model.manifest's own limits), applied again to
#: manifests stored before it refused unprintable text
MAX_RESULT_ITEMS: Final = 8
MAX_RESULT_KEY_CHARS: Final = 32
MAX_RESULT_VALUE_CHARS: Final = 1024


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout with the counts of its latest evaluation."""

    evaluation: Evaluation
    members: int


def _last_result(manifest: bytes) -> dict[str, str]:
    """The last install result of a stored manifest (verified when it was received)."""
    try:
        return DeviceManifest.from_dict(json.loads(manifest)["signed"]).last_result
    except VerificationError:
        # Stored before check-ins refused unprintable text: its words, made printable, still
        # count (a failure must not vanish because its error text was hostile).
        return _stored_last_result(manifest)
    except (ValueError, KeyError, TypeError):
        return {}


def _stored_last_result(manifest: bytes) -> dict[str, str]:
    try:
        raw = json.loads(manifest)["signed"]["last_result"]
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        printable_text(k, MAX_RESULT_KEY_CHARS): printable_text(v, MAX_RESULT_VALUE_CHARS)
        for k, v in list(raw.items())[:MAX_RESULT_ITEMS]
        if isinstance(k, str) and isinstance(v, str)
    }


def _nobody(_serials: Iterable[str]) -> None:
    """No one to tell (no MQTT bridge)."""


def _no_check(_rollout: Rollout) -> None:
    """Nothing to check before advancing (no fleet monitoring)."""


class Rollouts:
    """Rollouts: the operator's actions and their evaluation."""

    def __init__(
        self,
        *,
        store: RolloutStore,
        inventory: Inventory,
        releases: Callable[[], list[DirectorRelease]],
        clock: Callable[[], dt.datetime],
    ):
        """Work on ``store``; members come from ``inventory``; ``releases`` lists what is
        served (the director's parsed targets)."""
        self.store = store
        self.inventory = inventory
        self.releases = releases
        self.clock = clock
        #: told the members a rollout admits when it starts, resumes or advances (the
        #: MQTT hint, ADR 0026); they still poll with jitter
        self.on_admit: Callable[[Iterable[str]], None] = _nobody
        #: called before a phase advance or completion is stored (fleet monitoring)
        self.before_advance: Callable[[Rollout], None] = _no_check
        self._lock = Lock()

    # -- operator actions ------------------------------------------------------------------
    def create(self, rollout: Rollout) -> Rollout:
        """Start a rollout.

        Raises:
            OperatorError: the release is not served, or the group does not exist.
            NameExistsError: a rollout of this name exists.
        """
        self.inventory.store.group(rollout.group)  # UnknownNameError if absent
        if not any(r.info.version == rollout.version for r in self.releases()):
            raise StateConflictError(f"release {rollout.version} is not served by this server")
        self.store.create(rollout, now=self.clock())
        self._admit(rollout)
        logger.info(
            "rollout %s of %s to group %s created (phases %s)",
            rollout.name,
            rollout.version,
            rollout.group,
            ",".join(map(str, rollout.phases)),
        )
        return rollout

    def transition(self, name: str, action: str) -> Rollout:
        """``pause`` (an active rollout), ``resume`` (a paused or halted one: an operator
        who looked at the failures may go on) or ``cancel`` (any but completed).

        Raises:
            OperatorError: the action does not apply to the rollout's state.
            UnknownNameError: no such rollout.
        """
        allowed = {
            "pause": ("active",),
            "resume": ("paused", "halted"),
            "cancel": ("active", "paused", "halted"),
        }[action]
        target = {"pause": "paused", "resume": "active", "cancel": "cancelled"}[action]
        current = self.store.get(name)
        if current.state not in allowed:
            raise StateConflictError(f"cannot {action} rollout {name}: it is {current.state}")
        reason = current.reason if action == "cancel" else f"{target} by an operator"
        new = dataclasses.replace(current, state=target, reason=reason)
        if not self.store.change(new, expect_state=current.state, now=self.clock()):
            raise ConflictError(f"rollout {name} changed meanwhile; try again")
        logger.info("rollout %s %s", name, target)
        if target == "active":
            self._admit(new)
        return new

    def _admit(self, rollout: Rollout) -> None:
        """Hint the members the rollout admits now (those running it ignore the hint)."""
        self.on_admit(admitted(rollout, self.inventory.members(rollout.group)))

    # -- evaluation ------------------------------------------------------------------------
    def _outcomes(self, rollout: Rollout) -> dict[str, tuple[str, str]]:
        """Every device's standing in ``rollout`` from its last check-in, set-based: one
        query (:meth:`RolloutStore.last_reports`); only the manifests of devices that do
        not run the release but name it are parsed (the failures are among them)."""
        out: dict[str, tuple[str, str]] = {}
        for rep in self.store.last_reports(rollout.version):
            result = _last_result(rep.manifest) if rep.manifest is not None else {}
            standing = install_outcome(
                rollout.version, running=rep.running_version, last_result=result
            )
            if standing[0] != "pending":
                out[rep.serial] = standing
        return out

    def outcomes(self, rollout: Rollout) -> dict[str, tuple[str, str]]:
        """Every device that reported success or failure in ``rollout``: serial ->
        (``success`` | ``failure``, the error it reported)."""
        return self._outcomes(rollout)

    def status(self, rollout: Rollout) -> RolloutStatus:
        """Evaluate ``rollout`` now and store a change (halt, next phase, completion).

        Raises:
            ServerStorageError: a store failed.
        """
        members = self.inventory.members(rollout.group)
        outcomes = self._outcomes(rollout)
        result = evaluate(rollout, members, outcomes)
        new = result.rollout
        advancing = new.state == "completed" or (
            new.state == "active" and new.phase != rollout.phase
        )
        if result.changed and advancing:
            # About to admit more devices: fleet monitoring looks at the release first and
            # may pause the rollout (ADR 0026); the change below then finds it paused
            # and is not stored.
            self.before_advance(rollout)
        if result.changed:
            with self._lock:
                if self.store.change(result.rollout, expect_state=rollout.state, now=self.clock()):
                    new = result.rollout
                    if new.state == "halted":
                        logger.error("ALERT rollout %s %s", new.name, new.reason)
                    else:
                        if new.state == "active":
                            self._admit(new)
                        logger.info(
                            "rollout %s: %s, phase %d (%d%%)",
                            new.name,
                            new.state,
                            new.phase + 1,
                            new.percent,
                        )
                else:
                    # Another writer changed it first (the fleet monitor's pause just
                    # above, an operator, another process): answer with what is stored,
                    # not with the change that was not.
                    result = evaluate(self.store.get(rollout.name), members, outcomes)
        return RolloutStatus(result, len(members))

    def evaluate_all(self) -> None:
        """Evaluate every active rollout (the periodic task)."""
        for r in self.store.list():
            if r.state == "active":
                self.status(r)

    def orphans(self) -> list[tuple[DirectorRelease, tuple[str, ...]]]:
        """Served releases naming a hardware id no registered device has."""
        # The distinct ids only: listing every device each time cost a fifth of a
        # worker's CPU with 1,000 devices, and grew with the fleet (ADR 0019).
        hardware = self.inventory.devices.hardware_ids()
        if not hardware:  # no fleet yet: nothing can vanish from it
            return []
        return orphan_releases(self.releases(), hardware)


class ChannelPolicy:
    """The director's policy on the server (see :mod:`.channels`)."""

    def __init__(self, *, rollouts: Rollouts):
        """Decide from ``rollouts``' stores."""
        self.rollouts = rollouts

    def decision(
        self,
        *,
        serial: str,
        hardware_id: str,
        running: Version | None,
        assignment: Assignment | None,
        releases: Sequence[DirectorRelease],
        recorded: CheckinRecord | None = None,
    ) -> Decision:
        """What the director tells ``serial`` now, and why (also for ``fleet show``).

        Evaluates first the active rollouts whose release the device just reported a
        failed install of, so a failure halts the rollout before anyone else is admitted.
        A success is left to the periodic evaluation (and ``rollout status``): an updated
        device reports it at every check-in, and evaluating the whole rollout each time
        would cost a set-based evaluation per check-in of every updated device.
        """
        ro = self.rollouts
        if assignment is None and nothing_newer(
            hardware_id=hardware_id, running=running, releases=releases
        ):
            # most check-ins: a device on the newest release for its hardware, which no
            # group, opt-out or rollout can change (decide() answers the same): nothing
            # of the device to read (a statement per check-in, a fifth of its SQL)
            return Decision(None, UP_TO_DATE)
        # this device's rows only (one indexed statement), not the inventory's whole
        # tables: the cost of a check-in must not grow with the fleet (ADR 0012)
        view = ro.inventory.store.device_view(serial)
        groups = view.groups if view is not None else ()
        if recorded is not None:  # the check-in being answered: the device's newest
            last: CheckinRecord | None = recorded
        else:
            history = ro.inventory.checkins.history(serial, limit=1) if view is not None else []
            last = history[0] if history else None
        result = _last_result(last.manifest) if last is not None else {}
        views: list[RolloutView] = []
        for r in ro.store.list():
            # a rollout of what the device runs or older can change nothing for it (decide
            # skips it too): no member list for it, so the cost of a check-in does not grow
            # with the rollouts of the past
            if r.group not in groups or (running is not None and r.version <= running):
                continue
            if r.state == "active" and last is not None:
                standing = install_outcome(
                    r.version, running=last.running_version, last_result=result
                )
                if standing[0] == "failure":
                    r = ro.status(r).evaluation.rollout  # noqa: PLW2901 - the fresher one
            views.append(RolloutView(r, tuple(ro.inventory.members(r.group))))
        policies = ro.store.group_policies()  # kept until a change is announced
        no_features = view.no_features if view is not None else False
        now = ro.clock()
        return decide(
            device=DeviceFacts(
                serial=serial,
                hardware_id=hardware_id,
                running=running,
                groups=groups,
                no_features=no_features,
                assignment=assignment,
            ),
            releases=releases,
            rollouts=views,
            groups=policies,
            first_seen=ro.store.first_seen((r.name for r in releases), now=now),
            now=now,
        )

    def __call__(
        self,
        *,
        serial: str,
        hardware_id: str,
        running: Version | None,
        assignment: Assignment | None,
        releases: Sequence[DirectorRelease],
        recorded: CheckinRecord | None = None,
    ) -> DirectorRelease | None:
        """The :class:`~.director.Policy` call."""
        d = self.decision(
            serial=serial,
            hardware_id=hardware_id,
            running=running,
            assignment=assignment,
            releases=releases,
            recorded=recorded,
        )
        # DEBUG: the director logs what it instructs at every check-in; the reason is what
        # `fleet show` says (a second line per check-in cost the workers measurably)
        logger.debug("director policy for %s: %s", serial, d.reason)
        return d.release


class RolloutEvaluator(PeriodicTask):
    """Evaluates active rollouts and flags releases for unknown hardware, periodically."""

    def __init__(self, rollouts: Rollouts, *, interval: float = ROLLOUT_EVALUATION_INTERVAL):
        """Run :meth:`Rollouts.evaluate_all` every ``interval`` seconds."""
        super().__init__(interval=interval, name="rollout-evaluator")
        self.rollouts = rollouts
        self._flagged: set[str] = set()

    def _tick(self) -> None:
        try:
            self.rollouts.evaluate_all()
            for rel, unknown in self.rollouts.orphans():
                if rel.name not in self._flagged:
                    self._flagged.add(rel.name)
                    logger.warning(
                        "release %s names hardware id %s, which no registered device has",
                        rel.name,
                        ", ".join(unknown),
                    )
        except Exception:  # a thread boundary: log and keep the server up
            logger.exception("rollout evaluation failed")
