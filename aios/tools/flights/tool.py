"""Flight search over flights.json, the travel example's sample dataset (invented data).

The dataset holds a daily schedule and a price multiplier per date; the fare of a
flight on a date is round(base_price_eur * multiplier), so queries are deterministic.
"""
from __future__ import annotations

import json
import os
from typing import Any


class NotFound(LookupError):
    aios_code = "NOT_FOUND"


def _airport(data: dict[str, Any], field: str, text: str) -> str:
    wanted = text.strip().lower()
    for city, info in data["airports"].items():
        if wanted in (city.lower(), info["code"].lower()):
            return info["code"]
    known = [f"{c} ({i['code']})" for c, i in sorted(data["airports"].items())]
    raise NotFound(f"arguments.{field}: no sample flights for {text!r}; airports: {known}")


def run(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with open(os.path.join(ctx.tool_dir, "flights.json")) as f:
        data = json.load(f)
    origin = _airport(data, "origin", args["origin"])
    destination = _airport(data, "destination", args["destination"])
    date = args["date"]
    multiplier = data["price_multiplier_by_date"].get(date)
    if multiplier is None:
        raise NotFound(f"arguments.date: no sample flights on {date}; dates: {data['dates'][0]} to {data['dates'][-1]}")
    flights = []
    for row in data["daily_schedule"]:
        if row["origin"] == origin and row["destination"] == destination:
            price = round(row["base_price_eur"] * multiplier)
            if price <= args.get("max_price_eur", float("inf")):
                flights.append({k: v for k, v in row.items() if k != "base_price_eur"} | {"date": date, "price_eur": price})
    key = (lambda r: (r["departs"], r["flight"])) if args.get("sort") == "departure" else (lambda r: (r["price_eur"], r["departs"]))
    flights.sort(key=key)
    return {"origin": origin, "destination": destination, "date": date, "flights": flights,
            "source": "sample data (invented, for the travel example)"}
