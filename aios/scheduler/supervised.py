"""What the supervisor's process table tells the scheduler about the processes behind a service.

The scheduler learns that a manager died from its own heartbeats (silence for the expiry), which is
slow and, for a process that dies soon after each start, may never fire before the supervisor gives
up on it (FATAL). The supervisor's table (`processes.json`, read by the broker as `process_state`:
name -> (state, message), with BACKOFF or STARTING after repeated fast crashes reported as
CRASH-LOOPING) says so at once. Pure functions over it; the core acts on what they find.
"""
from __future__ import annotations

from typing import Callable, Iterable

from aios.scheduler.registry import ManagerRecord

#: name, fresh=False -> (state, message) or None (a process the supervisor does not run)
ProcessState = Callable[..., "tuple[str, str] | None"]

#: states of a process that cannot serve now: new requests for a service whose processes are all
#: in them are refused with UNAVAILABLE ...
CANNOT_SERVE = frozenset({"FATAL", "STOPPED", "CRASH-LOOPING"})
#: ... and of one that will not serve again: requests already queued for such a service are answered
WILL_NOT_SERVE = frozenset({"FATAL", "STOPPED"})
#: states in which the process has exited, so a registration under its name is stale (CRASH-LOOPING
#: is not one: it may be a new incarnation STARTING, which may already have registered)
EXITED = frozenset({"FATAL", "STOPPED", "BACKOFF"})


def service_down(expected: dict[str, str], process_state: ProcessState, service: str,
                 states: frozenset[str] = CANNOT_SERVE) -> str | None:
    """Why nothing can serve `service`, if each of its configured processes is in one of `states`."""
    names = [n for n, s in expected.items() if s == service]
    found = [(n, process_state(n)) for n in names]
    if not names or not all(st is not None and st[0] in states for _, st in found):
        return None
    # confirmed with a fresh read before refusing, and worded from it: the cached table may be half a
    # second old (a process seen CRASH-LOOPING there may be FATAL by now, or restarted)
    found = [(n, process_state(n, fresh=True)) for n in names]
    if not all(st is not None and st[0] in states for _, st in found):
        return None
    parts = [f"{n} is {st[0]}" + (f" ({st[1]})" if st[1] else "") for n, st in found if st]
    return f"service {service!r} cannot serve: " + "; ".join(parts)


def exited(managers: Iterable[ManagerRecord], process_state: ProcessState) -> list[tuple[ManagerRecord, str]]:
    """Registered managers whose process the supervisor says has exited, with that state. A state
    read from the cached table is confirmed with a fresh read: the cache may predate a restart
    whose new incarnation is the one registered."""
    out = []
    for mgr in managers:
        st = process_state(mgr.name)
        if st is not None and st[0] in EXITED:
            st = process_state(mgr.name, fresh=True)
            if st is not None and st[0] in EXITED:
                out.append((mgr, st[0]))
    return out
