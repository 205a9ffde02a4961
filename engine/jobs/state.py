"""QEMU 7.2's job state machine as pure tables: which status may follow which, and which verb each status
accepts (qemu job.c's JobSTT and JobVerbTable).  Pure module.
"""
from __future__ import annotations

STATUSES = ("undefined", "created", "running", "paused", "ready", "standby", "waiting", "pending",
            "aborting", "concluded", "null")

TRANSITIONS: dict[str, frozenset[str]] = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}

VERBS = ("cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss")

_LIVE = {"created", "running", "paused", "ready", "standby"}
VERB_STATES: dict[str, frozenset[str]] = {
    "cancel": frozenset(_LIVE | {"waiting", "pending"}),
    "pause": frozenset(_LIVE),
    "resume": frozenset(_LIVE),
    "set-speed": frozenset(_LIVE),
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}


class JobStateError(Exception):
    """A verb a job's status does not allow, with QEMU's text."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


def can_transition(old: str, new: str) -> bool:
    return new in TRANSITIONS.get(old, frozenset())


def check_verb(job_id: str, status: str, verb: str) -> None:
    """Raises JobStateError("Job 'ID' in state 'S' cannot accept command verb 'V'")."""
    if status not in VERB_STATES[verb]:
        raise JobStateError(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")
