"""Sandboxed tools cannot read the storage database configured with `[storage] path`.

Agents reach their files through the storage service only, never by reading its database: the
tool manager hides the database from sandboxed tool workers (aios/datadir.py,
`storage_private_paths`). It used to hide only the default data directory, so a database
configured elsewhere was readable by any snippet given to the python tool.

The database here is outside /tmp (a worker gets a private /tmp anyway) and outside $HOME (hidden
anyway), and readable by everyone, so that only the hiding stands between a snippet and the data,
under both confinement strategies ("root": setuid nobody; "userns": the kernel's own uid).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.kernel import KernelFactory

STRATEGIES = ["root", "userns"] if os.geteuid() == 0 else ["userns"]

pytestmark = pytest.mark.timeout(180)

#: the snippet: every way to the database's bytes it tries, and what each gave
SNOOP = """
import json, os
secret = {secret!r}.encode()
out = {{}}
for path in {files!r}:
    try:
        with open(path, "rb") as f:
            data = f.read()
        out[path] = ("SECRET " if secret in data else "") + f"read {{len(data)}} bytes"
    except OSError as exc:
        out[path] = "refused: " + (exc.strerror or type(exc).__name__)
try:
    out[{folder!r}] = "listed " + ",".join(sorted(os.listdir({folder!r})))
except OSError as exc:
    out[{folder!r}] = "refused: " + (exc.strerror or type(exc).__name__)
print(json.dumps(out))
"""


@pytest.fixture
def folder() -> Iterator[Path]:
    made = Path(tempfile.mkdtemp(prefix="aios-db-", dir="/var/tmp"))
    os.chmod(made, 0o755)
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_python_tool_cannot_read_the_configured_database(kernel: KernelFactory, folder: Path,
                                                              strategy: str) -> None:
    database = folder / "custom.sqlite3"
    database.touch()
    os.chmod(database, 0o644)  # SQLite gives the -wal and -shm files the same mode
    k = kernel(echo=False, builtins={"storage": {"path": str(database)},
                                     "tools": {"sandbox": "require", "sandbox_strategy": strategy}})
    secret = uuid.uuid4().hex
    with k.client("owner", timeout=30) as c:
        c.storage.write("diary.txt", f"the secret is {secret}")
    files = [str(database), f"{database}-wal", f"{database}-shm"]
    assert all(Path(p).exists() for p in files)  # the storage service has them open
    assert any(secret.encode() in Path(p).read_bytes() for p in files[:2])  # the data is there to find

    with k.client("snoop", timeout=60) as c:
        result = c.tools.call("python", code=SNOOP.format(secret=secret, files=files, folder=str(folder)))
    assert result["exit_code"] == 0, result
    assert secret not in json.dumps(result)
    outcomes = json.loads(result["stdout"])
    for path in files:
        assert outcomes[path].startswith("refused") or outcomes[path] == "read 0 bytes", (path, outcomes)
    assert outcomes[str(folder)] == "listed " or outcomes[str(folder)].startswith("refused"), outcomes
    with k.client("owner", timeout=30) as c:  # storage itself still has it, of course
        assert c.storage.read_text("diary.txt") == f"the secret is {secret}"
