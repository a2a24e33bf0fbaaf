"""Where a call between managers fits: the request it serves, its agent, its deadline, or why it is refused.

A handler's call (`messages.Call`) is made on behalf of the request its
manager is running (the parent): it takes the parent's agent, never the
caller's word, and at most the parent's time left. A call that would wait on
a service already waiting for it (a cycle: each side's handler thread blocked
on the other) is refused with CALL_CYCLE instead of deadlocking a thread
pool, and so is a chain deeper than MAX_CALL_DEPTH. Right after a scheduler
restart, a call whose parent is a run the caller still holds, not yet adopted
by the agent's re-send (`adoption.py`), is answered OVERLOADED: retried in a
moment, it finds its parent adopted.
"""
from __future__ import annotations

from dataclasses import dataclass

from aios.messages import Call
from aios.protocol import ErrorCode
from aios.scheduler.registry import ManagerRecord
from aios.scheduler.request import Job

#: calls between managers may nest this deep (agent -> memory -> storage is 2)
MAX_CALL_DEPTH = 8


@dataclass(frozen=True, slots=True)
class Refusal:
    code: ErrorCode
    message: str


def place_call(msg: Call, caller: ManagerRecord, now: float) -> tuple[Job, float | None] | Refusal:
    """(the parent request, the call's deadline in seconds from now), or why the call is refused."""
    parent = caller.inflight.get((msg.parent_client, msg.parent))
    if parent is None and caller.adoptable((msg.parent_client, msg.parent)):
        return Refusal(ErrorCode.OVERLOADED, f"the scheduler restarted and the request this call serves "
                                             f"({msg.parent!r}) has not been re-sent to it yet; retry in a moment")
    if parent is None:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "a call must be made while serving the request it is made for "
                                                   f"(request {msg.parent!r} is not running on {caller.name})")
    chain = parent.chain()
    path = " -> ".join(f"{r.service}.{r.op}" for r in reversed(chain)) + f" -> {msg.service}.{msg.op}"
    if any(r.service == msg.service for r in chain):
        return Refusal(ErrorCode.CALL_CYCLE, f"call cycle refused: {path} would wait on a {msg.service} request "
                                             "that is itself waiting for this call (a thread-pool deadlock)")
    if len(chain) >= MAX_CALL_DEPTH:
        return Refusal(ErrorCode.CALL_CYCLE,
                       f"calls nested too deep ({len(chain)} levels, at most {MAX_CALL_DEPTH}): {path}")
    deadline = msg.deadline
    if parent.deadline is not None:
        left = parent.deadline - now
        deadline = left if deadline is None else min(deadline, left)
        if deadline <= 0:
            return Refusal(ErrorCode.DEADLINE_EXCEEDED, f"the request this call serves has no time left ({path})")
    return parent, deadline
