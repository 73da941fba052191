"""The rollout state machines as tables: one for a rollout, one for each device in it.

Pure and I/O-free: states and events are ``StrEnum`` s whose values are the stable strings stored
in ``rollouts.state`` / ``rollout_devices.state`` (never renamed); :data:`ROLLOUT_TRANSITIONS`
and :data:`DEVICE_TRANSITIONS` map ``(state, event)`` to the next state, and are the only
place a transition is defined. :func:`rollout_next` and :func:`device_next` look a row up and
raise :class:`IllegalTransition` for a pair that is not in the table; the store derives every
state it writes from them, so a transition that is not a row cannot be persisted.

Rollout (strategy "canary": pending -> canary -> baking -> waves -> completed; "waves" and
"all": pending -> waves -> completed)::

    pending  --start_canary-->  canary      --canary_done-->  baking  --baked-->  waves
    pending  --start_waves--->  waves       --complete----->  completed
    canary   --complete------>  completed   (the canary was every device)
    pending|canary|baking|waves  --pause-->  paused  --resume-->  the state it was paused from
    pending|canary|baking|waves|paused  --abort-->  aborting  --rolled_back-->  aborted

Device in a rollout (an attempt is counted on each send)::

    pending       --send------->  sent          --commit--->  committed
    sent          --retry------>  pending       (a retryable failure or a deadline, attempts left)
    sent          --fail------->  failed
    sent          --time_out--->  timed_out
    pending       --cancel----->  cancelled     (never sent before the rollout was aborted)
    committed     --roll_back-->  rolling_back  (timed_out too: it installed the update late)
    committed     --no_rollback-> rollback_failed  (nothing to roll back to)
    rolling_back  --send|retry--> rolling_back  (the rollback command, again)
    rolling_back  --commit----->  rolled_back   --fail|time_out--> rollback_failed
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ACTIVE", "DEVICE_TRANSITIONS", "FINAL_DEVICE_STATES", "PAUSABLE", "ROLLOUT_TRANSITIONS",
           "DeviceEvent", "DeviceRolloutState", "IllegalTransition", "RolloutEvent", "RolloutState",
           "device_next", "rollout_next"]


class IllegalTransition(ValueError):
    """A (state, event) pair that is not a row of its transition table: a bug, never bad input."""


class RolloutState(StrEnum):
    """A rollout's state (stable names, stored in ``rollouts.state``)."""

    PENDING = "pending"        # created; the next step starts it
    CANARY = "canary"          # the canary wave is out
    BAKING = "baking"          # the canary finished; watching it for ``bake_s``
    WAVES = "waves"            # growing waves, rate-limited
    PAUSED = "paused"          # nothing new is sent; results still count
    ABORTING = "aborting"      # rolling the updated devices back
    COMPLETED = "completed"
    ABORTED = "aborted"


class RolloutEvent(StrEnum):
    START_CANARY = "start_canary"
    START_WAVES = "start_waves"
    CANARY_DONE = "canary_done"
    BAKED = "baked"
    COMPLETE = "complete"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLED_BACK = "rolled_back"


class DeviceRolloutState(StrEnum):
    """One device's state in one rollout (``rollout_devices.state``)."""

    PENDING = "pending"                  # not sent yet, or waiting for its next attempt
    SENT = "sent"                        # command published; waiting for its result or deadline
    COMMITTED = "committed"
    FAILED = "failed"                    # refused, failed its health check, or out of retries
    TIMED_OUT = "timed_out"              # no result within the tier's deadline, out of retries
    CANCELLED = "cancelled"              # never sent before the rollout was aborted
    ROLLING_BACK = "rolling_back"        # rollback command due or out
    ROLLED_BACK = "rolled_back"          # back on its previous version
    ROLLBACK_FAILED = "rollback_failed"


class DeviceEvent(StrEnum):
    SEND = "send"                # its command is published (a new attempt)
    COMMIT = "commit"            # it reported the update (or the rollback) committed
    RETRY = "retry"              # a retryable failure, or its deadline, with attempts left
    FAIL = "fail"                # a final failure
    TIME_OUT = "time_out"        # its deadline passed, no attempts left
    CANCEL = "cancel"            # the rollout aborted before it was sent
    ROLL_BACK = "roll_back"      # the rollout aborted and it runs the new version
    NO_ROLLBACK = "no_rollback"  # the rollout aborted and there is nothing to roll back to


R, E = RolloutState, RolloutEvent
PAUSABLE = (R.PENDING, R.CANARY, R.BAKING, R.WAVES)
ACTIVE = (*PAUSABLE, R.PAUSED, R.ABORTING)

# (state, event) -> next state. (paused, resume) -> paused stands for "the state it was paused
# from" (a history state, kept in rollouts.paused_from): see rollout_next.
ROLLOUT_TRANSITIONS: dict[tuple[RolloutState, RolloutEvent], RolloutState] = {
    (R.PENDING, E.START_CANARY): R.CANARY,
    (R.PENDING, E.START_WAVES): R.WAVES,
    (R.CANARY, E.CANARY_DONE): R.BAKING,
    (R.CANARY, E.COMPLETE): R.COMPLETED,
    (R.BAKING, E.BAKED): R.WAVES,
    (R.WAVES, E.COMPLETE): R.COMPLETED,
    **{(s, E.PAUSE): R.PAUSED for s in PAUSABLE},
    (R.PAUSED, E.RESUME): R.PAUSED,
    **{(s, E.ABORT): R.ABORTING for s in (*PAUSABLE, R.PAUSED)},
    (R.ABORTING, E.ROLLED_BACK): R.ABORTED,
}

D, V = DeviceRolloutState, DeviceEvent
DEVICE_TRANSITIONS: dict[tuple[DeviceRolloutState, DeviceEvent], DeviceRolloutState] = {
    (D.PENDING, V.SEND): D.SENT,
    (D.PENDING, V.CANCEL): D.CANCELLED,
    (D.SENT, V.COMMIT): D.COMMITTED,
    (D.SENT, V.RETRY): D.PENDING,
    (D.SENT, V.FAIL): D.FAILED,
    (D.SENT, V.TIME_OUT): D.TIMED_OUT,
    (D.COMMITTED, V.ROLL_BACK): D.ROLLING_BACK,
    (D.COMMITTED, V.NO_ROLLBACK): D.ROLLBACK_FAILED,
    (D.TIMED_OUT, V.ROLL_BACK): D.ROLLING_BACK,
    (D.ROLLING_BACK, V.SEND): D.ROLLING_BACK,
    (D.ROLLING_BACK, V.RETRY): D.ROLLING_BACK,
    (D.ROLLING_BACK, V.COMMIT): D.ROLLED_BACK,
    (D.ROLLING_BACK, V.FAIL): D.ROLLBACK_FAILED,
    (D.ROLLING_BACK, V.TIME_OUT): D.ROLLBACK_FAILED,
}

FINAL_DEVICE_STATES = (D.COMMITTED, D.FAILED, D.TIMED_OUT, D.CANCELLED, D.ROLLED_BACK, D.ROLLBACK_FAILED)


def rollout_next(state: str, event: str, paused_from: str | None = None) -> RolloutState:
    """The state ``event`` takes a rollout in ``state`` to. Resuming goes back to ``paused_from``.
    Raises IllegalTransition for a pair that is not a row."""
    try:
        to = ROLLOUT_TRANSITIONS[(RolloutState(state), RolloutEvent(event))]
    except (KeyError, ValueError):
        raise IllegalTransition(f"no rollout transition from {str(state)!r} on {str(event)!r}") from None
    if event == E.RESUME:
        if paused_from not in PAUSABLE:
            raise IllegalTransition(f"cannot resume a rollout paused from {str(paused_from)!r}")
        return RolloutState(paused_from)
    return to


def device_next(state: str, event: str) -> DeviceRolloutState:
    """The state ``event`` takes a device in ``state`` to. Raises IllegalTransition for a pair
    that is not a row."""
    try:
        return DEVICE_TRANSITIONS[(DeviceRolloutState(state), DeviceEvent(event))]
    except (KeyError, ValueError):
        raise IllegalTransition(f"no device transition from {str(state)!r} on {str(event)!r}") from None
