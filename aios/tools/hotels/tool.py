"""Hotel search over hotels.json, the travel example's sample dataset (invented data)."""
from __future__ import annotations

import json
import os
from typing import Any


class NotFound(LookupError):
    aios_code = "NOT_FOUND"


def run(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    with open(os.path.join(ctx.tool_dir, "hotels.json")) as f:
        hotels = json.load(f)["hotels"]
    cities = {h["city"].lower(): h["city"] for h in hotels}
    city = cities.get(args["city"].strip().lower())
    if city is None:
        raise NotFound(f"no sample hotels in {args['city']!r}; cities: {sorted(set(cities.values()))}")
    found = [h for h in hotels if h["city"] == city
             and h["price_per_night_eur"] <= args.get("max_price_eur", float("inf"))
             and h["stars"] >= args.get("min_stars", 0)
             and h["rating"] >= args.get("min_rating", 0)]
    found.sort(key=lambda h: (h["price_per_night_eur"], -h["rating"], h["name"]))
    return {"city": city, "hotels": found, "source": "sample data (invented, for the travel example)"}
