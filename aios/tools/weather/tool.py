"""Weather lookups over weather.json, the travel example's sample dataset (invented data)."""
from __future__ import annotations

import json
import os
from typing import Any


class NotFound(LookupError):
    aios_code = "NOT_FOUND"


def _data(ctx: Any) -> dict[str, Any]:
    with open(os.path.join(ctx.tool_dir, "weather.json")) as f:
        return json.load(f)


def run(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    data = _data(ctx)
    cities = {c.lower(): c for c in data["cities"]}
    city = cities.get(args["city"].strip().lower())
    if city is None:
        raise NotFound(f"no sample weather for {args['city']!r}; cities: {sorted(data['cities'])}")
    days = data["cities"][city]
    if "date" in args:
        day = days.get(args["date"])
        if day is None:
            raise NotFound(f"no sample weather for {city} on {args['date']}; dates: {min(days)} to {max(days)}")
        forecast = [{"date": args["date"], **day}]
    else:
        forecast = [{"date": d, **v} for d, v in sorted(days.items())]
    return {"city": city, "forecast": forecast, "source": "sample data (invented, for the travel example)"}
