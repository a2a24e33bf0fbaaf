"""Driving a backend the way the LLM core does, for the backend tests."""
from __future__ import annotations

from typing import Any

from aios.managers.llm.types import Backend, ChatArgs, ChatResult, Generation


#: two function tools in the OpenAI format, for tool-calling tests
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                      "b": {"type": "number"}},
                                                     "required": ["a", "b"]}}},
]


def q(text: str = "What is the capital of France?", **kw: Any) -> ChatArgs:
    return ChatArgs(messages=[{"role": "user", "content": text}], **kw)


def run(backend: Backend, args: ChatArgs, slice_tokens: int | None = None) -> tuple[ChatResult, list[str], int]:
    """Advance a slice, suspend, repeat until done; return the result, streamed pieces and slice count."""
    gen: Generation = backend.start(args)
    pieces: list[str] = []
    slices = 0
    while not gen.done:
        backend.advance(gen, slice_tokens, pieces.append)
        slices += 1
        if not gen.done:
            backend.suspend(gen)
        assert slices < 100
    return backend.finish(gen), pieces, slices
