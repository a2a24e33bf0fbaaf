"""The calling agent's files, through the storage service.

A builtin tool: it runs inside the tool manager because it calls another kernel
service. `ctx.call(service, op, **args)` is the manager's `ctx.call`, which acts
on behalf of the agent that called the tool, so the storage manager confines
every operation to that agent's namespace; this tool never names an agent and
cannot reach another one's files. Errors from storage (NOT_FOUND, QUOTA_EXCEEDED,
DENIED, ...) pass through with their codes.
"""
from __future__ import annotations

import base64
from typing import Any

STORAGE = "storage"


def run(args: dict[str, Any], ctx: Any) -> Any:
    op = args["op"]
    if op == "write":
        reply = ctx.call(STORAGE, "write", path=args["path"], data=args["data"])
    elif op == "list":
        reply = ctx.call(STORAGE, "list", prefix=args.get("path", ""))
    elif op == "read":
        reply = dict(ctx.call(STORAGE, "read", path=args["path"]))
        data = reply.pop("data", b"")
        try:  # a tool's result is JSON: text as text, anything else as base64
            reply["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            reply["base64"] = base64.b64encode(data).decode("ascii")
    else:  # delete, stat
        reply = ctx.call(STORAGE, op, path=args["path"])
    return {"op": op, **(reply if isinstance(reply, dict) else {"result": reply})}
