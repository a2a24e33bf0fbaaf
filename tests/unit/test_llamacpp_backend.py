"""The llama.cpp backend's pure helpers, without the model: stop sequences and UTF-8 held back
across pieces, JSON completeness, tool-call parsing, and the request checks every backend shares.
The backend on the real model is tested in tests/system/test_llamacpp_backend.py."""
from __future__ import annotations

import json

import pytest

from aios.managers.llm.backends.prompting import StopStream, Utf8Stream, json_complete, parse_tool_call
from aios.managers.llm.types import ChatArgs, ChatMessage, ToolSpec
from tests.support.llm_driver import TOOLS


def user(text: str, **kw: object) -> ChatArgs:
    return ChatArgs(messages=[ChatMessage(role="user", content=text)], **kw)


def test_stop_stream_holds_back_partial_stops() -> None:
    s = StopStream(stops=("###", "END"))
    out = [s.feed(c) for c in "  Hello world.\n\n##"]
    assert "".join(out) == "Hello world."  # leading/trailing whitespace and "##" held back
    assert s.feed("#") == "" and s.stopped
    s = StopStream(stops=("###",))
    assert s.feed("a #") == "a" and s.feed("b") == " #b"  # "#" was not a stop after all
    assert s.flush() == "" and not s.stopped


def test_utf8_stream_joins_split_characters() -> None:
    u = Utf8Stream()
    data = "é€".encode()
    assert u.feed(data[:1]) == "" and u.feed(data[1:3]) == "é" and u.feed(data[3:]) == "€"


def test_json_complete_and_tool_parsing() -> None:
    assert json_complete('{"a": "}"} ') and not json_complete('{"a": 1') and not json_complete("12")
    tools = [ToolSpec.model_validate(t) for t in TOOLS]
    call = parse_tool_call('Sure: ```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```', tools)
    assert call is not None and call.function["name"] == "add"
    assert json.loads(call.function["arguments"]) == {"a": 1, "b": 2}
    assert parse_tool_call('{"name": "nope", "arguments": {}}', tools) is None


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"type": "object", "properties": 5}],
                         ids=["schema-type", "schema-properties"])
def test_invalid_schemas_are_refused_before_any_backend(schema: dict) -> None:
    """Schema checks live in ChatArgs, so every backend (and the simulated one) refuses the same requests."""
    import pydantic
    with pytest.raises(pydantic.ValidationError) as ei:
        user("Hi", json_schema=schema)
    assert "not a valid JSON schema" in str(ei.value)
