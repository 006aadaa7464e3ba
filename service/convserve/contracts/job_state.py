"""A job's states (the proto's JobState) and the training process's phases: value types that the
server, the SDK, the job runner and the training process share. Standard library only."""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):  # a str: values are the names, as in the proto's JobState
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PROMOTED = "PROMOTED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"  # stopped with its replica; `resume` continues it

    @property
    def final(self) -> bool:
        """No more events follow (an INTERRUPTED job only continues if someone resumes it)."""
        return self in FINAL


FINAL = frozenset({JobState.PROMOTED, JobState.REJECTED, JobState.FAILED, JobState.CANCELLED,
                   JobState.INTERRUPTED})


class Phase(enum.StrEnum):
    """The training process's own steps in its "state" events (a job is RUNNING meanwhile); it
    ends with a JobState (PROMOTED, REJECTED, FAILED; run by hand, INTERRUPTED), SUCCEEDED (run
    by hand without a store) or STOPPED (a job's process on SIGTERM)."""

    LOADING_DATA = "LOADING_DATA"
    TRAINING = "TRAINING"
    EXPORTING = "EXPORTING"
    GATING = "GATING"
    SUCCEEDED = "SUCCEEDED"  # the end of a run without a model store: exported, nothing gated
    # A job's training process stopped on SIGTERM (its trainer stopping or dying), its last
    # epoch's checkpoint kept: not the job's end, which its trainer or recovery puts back in the
    # queue for the next attempt to resume.
    STOPPED = "STOPPED"
