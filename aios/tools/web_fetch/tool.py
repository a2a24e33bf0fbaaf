"""HTTP(S) GET limited to an allow-list of origins from the configuration.

Settings (tools option `settings.web_fetch`):
    allow = ["https://example.org", "http://127.0.0.1:8123"]   # scheme://host[:port]; empty = tool off
    max_bytes = 262144          # body bytes kept (default 256 KB); the rest is cut and flagged
    timeout_s = 10              # per request (connect and each read)

An origin matches on scheme, host (case-insensitive) and port (the scheme's
default when omitted). Every redirect is checked against the list again; no
proxy from the environment is used (the worker's environment has none anyway).
The check is by host name: an allowed name that resolves to an internal address
is reachable, so list only sites you trust.
"""
from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_MAX_BYTES = 256 * 1024
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_PORTS = {"http": 80, "https": 443}


class Denied(PermissionError):
    aios_code = "DENIED"


class BadUrl(ValueError):
    aios_code = "INVALID_ARGUMENT"


class FetchFailed(RuntimeError):
    aios_code = "UNAVAILABLE"


def origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise BadUrl(f"arguments.url: scheme {parts.scheme!r} is not allowed (http or https only)")
    if not parts.hostname:
        raise BadUrl(f"arguments.url: {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise BadUrl(f"arguments.url: {url!r} has an invalid port") from None
    return scheme, parts.hostname.lower(), port


def allowed_origins(settings: dict[str, Any]) -> set[tuple[str, str, int]]:
    out = set()
    for entry in settings.get("allow") or []:
        try:
            out.add(origin(str(entry) if "://" in str(entry) else f"https://{entry}"))
        except BadUrl:
            continue  # a malformed entry allows nothing
    return out


def check(url: str, allow: set[tuple[str, str, int]]) -> None:
    o = origin(url)
    if not allow:
        raise Denied("web_fetch is off: its allow-list is empty (tools option settings.web_fetch.allow)")
    if o not in allow:
        raise Denied(f"{o[0]}://{o[1]}:{o[2]} is not on the allow-list (tools option settings.web_fetch.allow)")


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def __init__(self, allow: set[tuple[str, str, int]]) -> None:
        self.allow = allow

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        check(urllib.parse.urljoin(req.full_url, newurl), self.allow)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def run(args: dict[str, Any], ctx: Any) -> dict[str, Any]:
    settings = ctx.settings or {}
    url = args["url"]
    allow = allowed_origins(settings)
    check(url, allow)
    max_bytes = int(settings.get("max_bytes", DEFAULT_MAX_BYTES))
    timeout = float(settings.get("timeout_s", DEFAULT_TIMEOUT_S))
    remaining = ctx.remaining()
    if remaining is not None:
        timeout = max(0.1, min(timeout, remaining - 0.5))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Redirects(allow))
    request = urllib.request.Request(url, headers={"User-Agent": "AIOS-web_fetch/0.1", "Accept": "*/*"})
    try:
        with opener.open(request, timeout=timeout) as resp:
            status, final_url, headers = resp.status, resp.geturl(), resp.headers
            body = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        status, final_url, headers = exc.code, exc.geturl(), exc.headers
        body = exc.read(max_bytes + 1) if exc.fp is not None else b""
    except Denied:
        raise
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchFailed(f"fetching {url} failed: {reason}") from None
    truncated = len(body) > max_bytes
    body = body[:max_bytes]
    content_type = headers.get("Content-Type", "")
    charset = headers.get_content_charset() or "utf-8"
    textual = content_type.startswith("text/") or any(t in content_type for t in ("json", "xml", "javascript"))
    result: dict[str, Any] = {"url": final_url, "status": status, "content_type": content_type,
                              "bytes": len(body), "truncated": truncated}
    if textual or not content_type:
        result["text"] = body.decode(charset, errors="replace")
    else:
        result["text"] = None
        result["note"] = f"binary content ({content_type}) not returned"
    return result
