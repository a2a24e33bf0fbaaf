"""The tools shipped with AIOS, each called through the runtime (validated, in a real confined worker)."""
from __future__ import annotations

import datetime as dt
import http.server
import json
import math
import threading
from typing import Any, Iterator

import pytest

from aios.managers.tools.runtime import SHIPPED_TOOLS_DIR, ToolRuntime
from aios.protocol import ErrorCode
from tests.support.errors import op_error

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def rt() -> Iterator[ToolRuntime]:
    runtime = ToolRuntime()
    try:
        yield runtime
    finally:
        runtime.close()




def test_every_shipped_tool_loads() -> None:
    with ToolRuntime() as runtime:
        assert runtime.problems == []
        assert {t.name for t in runtime.list()} == {"calculator", "python", "files", "clock", "web_fetch",
                                                     "weather", "flights", "hotels"}


# ----------------------------------------------------------------- calculator
@pytest.mark.parametrize("expression, value", [
    ("2 * (3 + 4) / 5", 2.8), ("-2**2", -4), ("2^10", 1024), ("7 // 2", 3), ("7 % 3", 1), ("2**-1", 0.5),
    ("sqrt(16) + abs(-3)", 7.0), ("log(8, 2)", 3.0), ("max(1, 5, 3) - min(4, 2)", 3), ("round(2.567, 2)", 2.57),
    ("1e3 + .5", 1000.5), ("pi", math.pi), ("((1 + 2) * (3 + 4))", 21),
])
def test_calculator_values(rt: ToolRuntime, expression: str, value: float) -> None:
    assert rt.call("calculator", {"expression": expression}, agent="calc")["value"] == pytest.approx(value)


def test_calculator_keeps_big_integers_exact(rt: ToolRuntime) -> None:
    out = rt.call("calculator", {"expression": "2**100 + 1"}, agent="calc")
    assert out == {"expression": "2**100 + 1", "value": str(2 ** 100 + 1), "exact_integer": True}


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "unexpected character"),
    ("open", "unknown name 'open'"),
    ("exec(1)", "unknown function 'exec'"),
    ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "more than 4096 bits"),
    ("(" * 80 + "1" + ")" * 80, "nested deeper"),
    ("2 +", "unexpected the end"),
    ("(-8) ** 0.5", "complex"),
    ("10.0 ** 400", "too large"),
    ("sqrt(-1)", "math domain error"),
])
def test_calculator_refuses_what_is_not_arithmetic(rt: ToolRuntime, expression: str, message: str) -> None:
    err = op_error(rt.call, "calculator", {"expression": expression}, agent="calc")
    assert err.code == ErrorCode.INVALID_ARGUMENT and message in err.message


# ---------------------------------------------------------------------- clock
def test_clock_now_is_the_current_time(rt: ToolRuntime) -> None:
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    out = rt.call("clock", {"op": "now"}, agent="clock")
    after = dt.datetime.now(dt.timezone.utc)
    assert before <= dt.datetime.fromisoformat(out["iso"]) <= after
    paris = rt.call("clock", {"op": "now", "timezone": "Europe/Paris"}, agent="clock")
    offset = dt.datetime.fromisoformat(paris["iso"]).utcoffset()
    assert offset in (dt.timedelta(hours=1), dt.timedelta(hours=2))


def test_clock_date_arithmetic(rt: ToolRuntime) -> None:
    assert rt.call("clock", {"op": "add", "date": "2024-02-27", "days": 3}, agent="c") == {
        "op": "add", "date": "2024-02-27", "iso": "2024-03-01", "weekday": "Friday"}  # leap year
    assert rt.call("clock", {"op": "add", "date": "2025-07-01T22:00:00", "hours": 5}, agent="c")["iso"] == "2025-07-02T03:00:00"
    diff = rt.call("clock", {"op": "diff", "start": "2025-01-01", "end": "2025-03-01"}, agent="c")
    assert diff["days"] == 59 and diff["seconds"] == 59 * 86400
    assert rt.call("clock", {"op": "weekday", "date": "2025-07-14"}, agent="c")["weekday"] == "Monday"
    err = op_error(rt.call, "clock", {"op": "now", "timezone": "Mars/Olympus"}, agent="c")
    assert err.code == ErrorCode.INVALID_ARGUMENT and "unknown timezone" in err.message
    err = op_error(rt.call, "clock", {"op": "add", "date": "tomorrow"}, agent="c")
    assert "arguments.date" in err.message
    err = op_error(rt.call, "clock", {"op": "diff", "start": "2025-01-01"}, agent="c")
    assert err.code == ErrorCode.INVALID_ARGUMENT and "'end' is a required property" in err.message


# --------------------------------------------------------------------- travel
def sample(tool: str, file: str) -> Any:
    return json.loads((SHIPPED_TOOLS_DIR / tool / file).read_text())


def test_travel_datasets_say_they_are_sample_data(rt: ToolRuntime) -> None:
    for tool, file in (("weather", "weather.json"), ("flights", "flights.json"), ("hotels", "hotels.json")):
        assert sample(tool, file)["_note"].startswith("SAMPLE DATA")
        assert "SAMPLE DATASET" in rt.describe(tool).description


def test_weather_by_city_and_date(rt: ToolRuntime) -> None:
    data = sample("weather", "weather.json")["cities"]
    out = rt.call("weather", {"city": "tokyo", "date": "2025-07-05"}, agent="t")
    assert out["city"] == "Tokyo" and out["forecast"] == [{"date": "2025-07-05", **data["Tokyo"]["2025-07-05"]}]
    week = rt.call("weather", {"city": "Rome"}, agent="t")["forecast"]
    assert [d["date"] for d in week] == sorted(data["Rome"])
    err = op_error(rt.call, "weather", {"city": "Atlantis"}, agent="t")
    assert err.code == ErrorCode.NOT_FOUND and "Paris" in err.message
    err = op_error(rt.call, "weather", {"city": "Paris", "date": "2031-01-01"}, agent="t")
    assert err.code == ErrorCode.NOT_FOUND and "2025-07-01 to 2025-07-14" in err.message


def test_flights_by_origin_destination_and_date(rt: ToolRuntime) -> None:
    data = sample("flights", "flights.json")
    mult = data["price_multiplier_by_date"]["2025-07-09"]
    expected = sorted(round(r["base_price_eur"] * mult) for r in data["daily_schedule"]
                      if r["origin"] == "LHR" and r["destination"] == "HND")
    out = rt.call("flights", {"origin": "London", "destination": "HND", "date": "2025-07-09"}, agent="t")
    assert [f["price_eur"] for f in out["flights"]] == expected and expected
    assert all(f["date"] == "2025-07-09" and f["origin"] == "LHR" for f in out["flights"])
    by_time = rt.call("flights", {"origin": "LHR", "destination": "HND", "date": "2025-07-09", "sort": "departure"},
                      agent="t")["flights"]
    assert [f["departs"] for f in by_time] == sorted(f["departs"] for f in by_time)
    cheap = rt.call("flights", {"origin": "LHR", "destination": "HND", "date": "2025-07-09",
                                "max_price_eur": expected[0]}, agent="t")["flights"]
    assert [f["price_eur"] for f in cheap] == [p for p in expected if p <= expected[0]]
    err = op_error(rt.call, "flights", {"origin": "Paris", "destination": "Gotham", "date": "2025-07-09"}, agent="t")
    assert err.code == ErrorCode.NOT_FOUND and "arguments.destination" in err.message


def test_hotels_by_city_and_price(rt: ToolRuntime) -> None:
    hotels = [h for h in sample("hotels", "hotels.json")["hotels"] if h["city"] == "Barcelona"]
    out = rt.call("hotels", {"city": "barcelona"}, agent="t")["hotels"]
    assert [h["price_per_night_eur"] for h in out] == sorted(h["price_per_night_eur"] for h in hotels)
    limit = sorted(h["price_per_night_eur"] for h in hotels)[1]
    capped = rt.call("hotels", {"city": "Barcelona", "max_price_eur": limit}, agent="t")["hotels"]
    assert len(capped) == sum(1 for h in hotels if h["price_per_night_eur"] <= limit)
    starred = rt.call("hotels", {"city": "Barcelona", "min_stars": 4}, agent="t")["hotels"]
    assert all(h["stars"] >= 4 for h in starred)
    assert len(starred) == sum(1 for h in hotels if h["stars"] >= 4)


# ---------------------------------------------------------------------- files
# The files tool calls the storage service; it is tested end to end through the real kernel (tool
# manager + storage manager) in tests/system/test_tools_kernel.py. Here: what needs no storage at all.


def test_files_tool_validates_before_calling_storage(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "files", {"op": "write", "path": "x.txt"}, agent="w")
    assert err.code == ErrorCode.INVALID_ARGUMENT and "'data' is a required property" in err.message
    err = op_error(rt.call, "files", {"op": "chmod", "path": "x.txt"}, agent="w")
    assert err.code == ErrorCode.INVALID_ARGUMENT and "arguments.op" in err.message
    err = op_error(rt.call, "files", {"op": "list"}, agent="w")  # valid, but no kernel to call
    assert err.code == ErrorCode.UNAVAILABLE and "call_fn" in err.message


# ------------------------------------------------------------------ web_fetch
class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        if self.path == "/hello":
            body, ctype = "hello from the test server".encode(), "text/plain; charset=utf-8"
        elif self.path == "/big":
            body, ctype = b"y" * 100_000, "text/plain"
        elif self.path == "/bounce-inside":
            self.send_response(302)
            self.send_header("Location", "/hello")
            self.end_headers()
            return
        elif self.path == "/bounce-outside":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/hello")
            self.end_headers()
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_web_fetch_is_off_by_default(rt: ToolRuntime, http_server: http.server.ThreadingHTTPServer) -> None:
    assert not rt.describe("web_fetch").enabled
    err = op_error(rt.call, "web_fetch", {"url": f"http://127.0.0.1:{http_server.server_port}/hello"}, agent="w")
    assert err.code == ErrorCode.DENIED and "settings.web_fetch.allow" in err.message


def test_web_fetch_allow_list(http_server: http.server.ThreadingHTTPServer) -> None:
    port = http_server.server_port
    origin = f"http://127.0.0.1:{port}"
    _Handler.hits.clear()
    with ToolRuntime([], {"settings": {"web_fetch": {"allow": [origin], "max_bytes": 1000}}}) as runtime:
        assert runtime.describe("web_fetch").enabled
        out = runtime.call("web_fetch", {"url": f"{origin}/hello"}, agent="w")
        assert out["status"] == 200 and out["text"] == "hello from the test server" and not out["truncated"]
        big = runtime.call("web_fetch", {"url": f"{origin}/big"}, agent="w")
        assert big["truncated"] and big["bytes"] == 1000
        assert runtime.call("web_fetch", {"url": f"{origin}/bounce-inside"}, agent="w")["text"].startswith("hello")
        assert runtime.call("web_fetch", {"url": f"{origin}/nothing"}, agent="w")["status"] == 404
        hits_before = list(_Handler.hits)
        err = op_error(runtime.call, "web_fetch", {"url": f"http://localhost:{port}/hello"}, agent="w")
        assert err.code == ErrorCode.DENIED and f"http://localhost:{port} is not on the allow-list" in err.message
        err = op_error(runtime.call, "web_fetch", {"url": f"https://127.0.0.1:{port}/hello"}, agent="w")
        assert err.code == ErrorCode.DENIED  # same host, other scheme
        assert _Handler.hits == hits_before  # refused hosts were never contacted
        err = op_error(runtime.call, "web_fetch", {"url": f"{origin}/bounce-outside"}, agent="w")
        assert err.code == ErrorCode.DENIED and "localhost" in err.message  # redirects are checked too
        err = op_error(runtime.call, "web_fetch", {"url": "file:///etc/passwd"}, agent="w")
        assert err.code == ErrorCode.INVALID_ARGUMENT and "scheme" in err.message
