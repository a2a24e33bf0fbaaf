"""Current time and date arithmetic with the standard library (datetime, zoneinfo)."""
from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


class ClockError(ValueError):
    aios_code = "INVALID_ARGUMENT"


def _zone(name: str | None) -> dt.tzinfo:
    if not name or name.upper() == "UTC":
        return dt.timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ClockError(f"arguments.timezone: unknown timezone {name!r} (use an IANA name like 'Europe/Paris')") from None


def _parse(field: str, text: str) -> dt.date | dt.datetime:
    try:
        if "T" in text or " " in text.strip():
            return dt.datetime.fromisoformat(text)
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ClockError(f"arguments.{field}: {text!r} is not an ISO 8601 date or datetime "
                         f"(e.g. '2025-06-01' or '2025-06-01T14:30:00')") from None


def _show(value: dt.date | dt.datetime) -> dict[str, Any]:
    return {"iso": value.isoformat(), "weekday": WEEKDAYS[value.weekday()]}


def run(args: dict[str, Any]) -> dict[str, Any]:
    op = args["op"]
    if op == "now":
        now = dt.datetime.now(_zone(args.get("timezone"))).replace(microsecond=0)
        return {"op": op, **_show(now), "date": now.date().isoformat(), "time": now.time().isoformat(),
                "timezone": args.get("timezone") or "UTC", "unix": int(now.timestamp())}
    if op == "weekday":
        value = _parse("date", args["date"])
        return {"op": op, "date": value.isoformat(), "weekday": WEEKDAYS[value.weekday()]}
    if op == "add":
        value = _parse("date", args["date"])
        delta = dt.timedelta(days=args.get("days", 0), weeks=args.get("weeks", 0), hours=args.get("hours", 0),
                             minutes=args.get("minutes", 0), seconds=args.get("seconds", 0))
        if not isinstance(value, dt.datetime) and delta % dt.timedelta(days=1):
            value = dt.datetime.combine(value, dt.time())  # a date plus hours becomes a datetime
        try:
            result = value + delta
        except OverflowError:
            raise ClockError("the result is outside the years 1-9999") from None
        return {"op": op, "date": value.isoformat(), **_show(result)}
    start, end = _parse("start", args["start"]), _parse("end", args["end"])
    if isinstance(start, dt.datetime) != isinstance(end, dt.datetime):
        start = start if isinstance(start, dt.datetime) else dt.datetime.combine(start, dt.time())
        end = end if isinstance(end, dt.datetime) else dt.datetime.combine(end, dt.time())
    if isinstance(start, dt.datetime) and isinstance(end, dt.datetime) and (start.tzinfo is None) != (end.tzinfo is None):
        raise ClockError("arguments.start/end: both must have a timezone offset, or neither")
    delta = end - start
    seconds = delta.total_seconds()
    return {"op": op, "start": start.isoformat(), "end": end.isoformat(), "days": delta.days if not delta.seconds
            else round(seconds / 86400, 6), "seconds": seconds, "weeks": round(seconds / 604800, 6)}
