"""Service helpers of the SDK, written once and bound to both clients.

`kernel.llm.chat(...)` on a sync `Client` returns the reply; on an
`AsyncClient` the same method returns an awaitable, because every helper
only builds the call and hands it to the client's `request`, which waits in
the client's own way. New services add a class here and one attribute in
`_ClientBase.__init__`.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, Callable

from aios.calls import PartialHandler, CallResult
from aios.memory_ids import new_entry_id
from aios.sdk.errors import AIOSError


class Service:
    """Base of the helpers: `self._client.request(...)` is sync or async depending on the client."""

    service: str = ""

    def __init__(self, client: Any) -> None:
        self._client = client

    def _request(self, op: str, args: dict[str, Any], *, timeout: float | None = None,
                 idempotent: bool | None = None, target: str | None = None,
                 on_partial: PartialHandler | None = None, then: Callable[[CallResult], Any] | None = None) -> Any:
        return self._client.request(self.service, op, args, timeout=timeout, idempotent=idempotent,
                                    target=target, on_partial=on_partial, then=then)

    def _result(self, op: str, args: dict[str, Any], **kw: Any) -> Any:
        """Call `op` and return just its result."""
        return self._request(op, args, then=_result, **kw)


def _result(reply: CallResult) -> Any:
    return reply.result


def chat_args(messages: list[dict[str, Any]] | str, model: str | None, stream: bool,
              options: dict[str, Any]) -> dict[str, Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    args = {"messages": messages, "stream": stream, **options}
    if model is not None:
        args["model"] = model
    return args


def token_sink(on_token: Callable[[str], None] | None) -> PartialHandler | None:
    """Turn streamed partials into `on_token(text)` calls that never show text twice.

    When the kernel restarts a call (its LLM core died, or the core holding its saved context did),
    it sends a reset and streams the answer again from the start. The text already shown is then
    skipped while the new stream repeats it (at temperature 0 it does, token for token); only what
    goes beyond it is passed on. If the new stream differs, what differs is passed on from where it
    diverged: the final reply's content is the authority.
    """
    if on_token is None:
        return None
    shown = ""
    replay: str | None = None  # text of the restarted stream, while it is still catching up

    def handle(body: Any) -> None:
        nonlocal shown, replay
        if not isinstance(body, dict):
            return
        if body.get("reset"):
            replay = ""
            return
        delta = body.get("delta")
        if not isinstance(delta, str) or not delta:
            return
        if replay is None:
            shown += delta
            on_token(delta)
            return
        replay += delta
        if shown.startswith(replay):
            return  # still repeating what the caller has seen
        common = len(os.path.commonprefix([shown, replay]))
        fresh = replay[common:]
        shown, replay = replay, None
        if fresh:
            on_token(fresh)

    return handle


class LLMService(Service):
    """The `llm` syscalls: generation on the kernel's model cores (scheduled, preemptible)."""

    service = "llm"

    def generate(self, op: str, messages: list[dict[str, Any]] | str, *, model: str | None = None,
                 on_token: Callable[[str], None] | None = None, timeout: float | None = None,
                 **options: Any) -> Any:
        """`llm.<op>` (chat, json or tools) with `messages` (a plain string is one user message)."""
        return self._request(op, chat_args(messages, model, on_token is not None, options), target=model,
                             timeout=timeout, idempotent=True, on_partial=token_sink(on_token))

    def chat(self, messages: list[dict[str, Any]] | str, *, model: str | None = None,
             on_token: Callable[[str], None] | None = None, timeout: float | None = None, **options: Any) -> Any:
        """The model answers `messages`.

        `on_token` streams the answer's text as it is generated. Options:
        temperature, max_tokens, stop, seed and the other sampling options.
        Returns the CallResult: `.result` is {message, finish_reason, usage, model},
        `.timing` says how long the call waited and ran.
        """
        return self.generate("chat", messages, model=model, on_token=on_token, timeout=timeout, **options)

    def json(self, messages: list[dict[str, Any]] | str, json_schema: dict[str, Any], *, model: str | None = None,
             timeout: float | None = None, **options: Any) -> Any:
        """Like chat, with the output constrained to JSON valid for `json_schema`; `.result["parsed"]` has it."""
        return self.generate("json", messages, model=model, timeout=timeout, json_schema=json_schema, **options)

    def tools(self, messages: list[dict[str, Any]] | str, tools: list[Any], *, model: str | None = None,
              timeout: float | None = None, **options: Any) -> Any:
        """Like chat; the model may answer with OpenAI-style tool calls (`.result["tool_calls"]`)."""
        return self.generate("tools", messages, model=model, timeout=timeout, tools=tools, **options)

    def info(self, *, model: str | None = None) -> Any:
        """The serving core's backend, models and context-store figures."""
        return self._result("info", {}, target=model, idempotent=True)


class KernelService(Service):
    """The scheduler's own `kernel` service."""

    service = "kernel"

    def ping(self) -> Any:
        return self._result("ping", {}, idempotent=True)

    def status(self) -> Any:
        return self._result("status", {}, idempotent=True)

    def shutdown(self) -> Any:
        return self._result("shutdown", {}, idempotent=False)


def _catching(pending: Any, on_error: Callable[[AIOSError], Any]) -> Any:
    """A chained call's outcome, with AIOSError turned into `on_error(exc)`: for an async client the
    call is an awaitable that raises only when awaited, so the catching happens inside a coroutine."""
    if inspect.isawaitable(pending):
        async def caught() -> Any:
            try:
                return await pending
            except AIOSError as exc:
                return on_error(exc)
        return caught()
    return pending


def _field(name: str) -> Callable[[CallResult], Any]:
    return lambda reply: reply.result[name]


class StorageService(Service):
    """The `storage` syscalls: the calling agent's own files, durable, versioned and searchable.

    Paths are relative ("notes/today.md"); each agent has its own namespace. Every write keeps a
    version; `history` lists them and `rollback` restores one (as a new version).
    """

    service = "storage"

    def write(self, path: str, data: str | bytes, *, timeout: float | None = None) -> Any:
        """Write a file (text is stored as UTF-8); returns its info (path, version, size, ...)."""
        return self._result("write", {"path": path, "data": data}, timeout=timeout, idempotent=False)

    def append(self, path: str, data: str | bytes, *, timeout: float | None = None) -> Any:
        return self._result("append", {"path": path, "data": data}, timeout=timeout, idempotent=False)

    def read(self, path: str, *, version: int | None = None, timeout: float | None = None) -> Any:
        """The file's bytes (or those of a kept `version`)."""
        return self._request("read", {"path": path, "version": version}, timeout=timeout, idempotent=True,
                             then=_field("data"))

    def read_text(self, path: str, *, version: int | None = None, encoding: str = "utf-8",
                  timeout: float | None = None) -> Any:
        return self._request("read", {"path": path, "version": version}, timeout=timeout, idempotent=True,
                             then=lambda reply: reply.result["data"].decode(encoding))

    def stat(self, path: str) -> Any:
        return self._result("stat", {"path": path}, idempotent=True)

    def list(self, prefix: str = "", *, recursive: bool = True, include_deleted: bool = False,
             limit: int = 1000) -> Any:
        """[{path, size, version, modified, ...}] under `prefix`."""
        return self._request("list", {"prefix": prefix, "recursive": recursive, "include_deleted": include_deleted,
                                      "limit": limit}, idempotent=True, then=_field("files"))

    def delete(self, path: str, *, purge: bool = False) -> Any:
        """Delete (history is kept, so `rollback` can restore it; `purge=True` frees it for good)."""
        return self._result("delete", {"path": path, "purge": purge}, idempotent=False)

    def history(self, path: str) -> Any:
        """The kept versions, newest first: [{version, op, size, created, current}]."""
        return self._request("history", {"path": path}, idempotent=True, then=_field("versions"))

    def rollback(self, path: str, version: int) -> Any:
        """Make a kept version current again (a new version with exactly its content)."""
        return self._result("rollback", {"path": path, "version": version}, idempotent=False)

    def search(self, query: str, *, limit: int = 10, match: str = "all") -> Any:
        """Ranked full-text search of this agent's files: [{path, version, score, snippet}]."""
        return self._request("search", {"query": query, "limit": limit, "match": match}, idempotent=True,
                             then=_field("hits"))

    def stats(self) -> Any:
        return self._result("stats", {}, idempotent=True)


class ToolsService(Service):
    """The `tools` syscalls: tools run by the kernel, validated, isolated and limited per tool."""

    service = "tools"

    def call(self, name: str, /, *, timeout: float | None = None, idempotent: bool | None = None,
             **arguments: Any) -> Any:
        """Run tool `name` with `arguments`; returns its result (JSON data)."""
        return self._request("call", {"arguments": arguments}, target=name, timeout=timeout,
                             idempotent=bool(idempotent), then=_field("result"))

    def list(self) -> Any:
        """Every tool: [{name, description, parameters, limit, timeout_s, enabled, isolation, ...}]."""
        return self._request("list", {}, idempotent=True, then=_field("tools"))

    def describe(self, name: str) -> Any:
        return self._result("describe", {"name": name}, idempotent=True)

    def functions(self, names: list[str] | None = None) -> Any:
        """OpenAI-style function schemas of these tools (default: every enabled one)."""
        return self._request("functions", {"names": names}, idempotent=True, then=_field("functions"))

    def step(self, messages: list[dict[str, Any]] | str, tools: list[Any], *, model: str | None = None,
             timeout: float | None = None, **options: Any) -> Any:
        """One step of tool use: the model picks a call among `tools` (registered tool names, or
        OpenAI-style schemas), the kernel validates and runs it, and you get both.

        Returns {"message": the model's reply, "call": the tool call (or None if it answered in
        text), "result": the tool's result, "error": {code, message} if the tool refused or failed
        the call (else None), "messages": the two messages to append to the conversation (the
        assistant's call and the tool's answer) for the next step}.
        """
        client = self._client

        def run_call(reply: CallResult) -> Any:
            result = reply.result
            calls = result.get("tool_calls") or []
            if not calls:
                return {"message": result["message"], "call": None, "result": None, "messages": [result["message"]]}
            call = calls[0]
            name = call["function"]["name"]
            try:
                arguments = json.loads(call["function"].get("arguments") or "{}")
            except ValueError:
                arguments = {}

            def outcome(value: Any, error: dict[str, Any] | None) -> Any:
                shown = {"error": error} if error else value
                return {"message": result["message"], "call": call, "result": value, "error": error,
                        "messages": [{"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "tool_call_id": call["id"], "name": name,
                                      "content": json.dumps(shown, ensure_ascii=False)}]}

            def failed(exc: AIOSError) -> Any:
                # the model's call was refused or failed: the step still returns, with the error for the
                # conversation (so the next step can correct it) instead of raising
                return outcome(None, {"code": exc.code, "message": exc.message})

            try:
                pending = client.request("tools", "call",
                                         {"arguments": arguments if isinstance(arguments, dict) else {}},
                                         target=name, timeout=timeout, idempotent=False,
                                         then=lambda tool_reply: outcome(tool_reply.result["result"], None))
            except AIOSError as exc:
                return failed(exc)
            return _catching(pending, failed)

        args = chat_args(messages, model, False, {"tools": tools, **options})
        return client.request("llm", "tools", args, target=model, timeout=timeout, idempotent=True, then=run_call)


class MemoryService(Service):
    """The `memory` syscalls: the calling agent's memory, fast (in RAM, compressed) and durable
    (written through to storage before each write returns); cold entries come back on access."""

    service = "memory"

    def add(self, content: str, metadata: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Keep a new entry; returns {id, content, metadata, created, updated}.

        The entry's id is made here, once per add, and sent with it: so the add is safe to repeat
        (a re-run after the memory manager died, or a re-send after the scheduler restarted, finds
        the entry instead of adding a copy), and it is re-sent and re-run like any idempotent call."""
        return self._result("add", {"content": content, "metadata": metadata or {}, "id": new_entry_id()},
                            timeout=timeout, idempotent=True)

    def get(self, entry_id: str) -> Any:
        return self._result("get", {"id": entry_id}, idempotent=True)

    def update(self, entry_id: str, *, content: str | None = None, metadata: dict[str, Any] | None = None) -> Any:
        """Replace the content and/or the whole metadata map."""
        args: dict[str, Any] = {"id": entry_id}
        if content is not None:
            args["content"] = content
        if metadata is not None:
            args["metadata"] = metadata
        return self._result("update", args, idempotent=True)

    def delete(self, entry_id: str) -> Any:
        return self._result("delete", {"id": entry_id}, idempotent=False)

    def list(self, *, offset: int = 0, limit: int = 100) -> Any:
        """{"entries": [summaries, oldest first], "total", "offset"} (no content: `get` an entry for it)."""
        return self._result("list", {"offset": offset, "limit": limit}, idempotent=True)

    def search(self, query: str, *, limit: int = 10, rankings: list[str] | None = None) -> Any:
        """Ranked entries: [{id, content, metadata, score, ranking, source}, ...], by keywords and by
        meaning merged, or by the rankings named (["bm25"] or ["embedding"])."""
        args: dict[str, Any] = {"query": query, "limit": limit}
        if rankings is not None:
            args["rankings"] = rankings
        return self._request("search", args, idempotent=True, then=_field("hits"))

    def stats(self) -> Any:
        return self._result("stats", {}, idempotent=True)
