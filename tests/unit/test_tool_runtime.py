"""Tool manifests, read without starting a worker (the tool runtime itself, with real worker
subprocesses, is tested in tests/system/test_tool_runtime.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from aios.managers.tools.manifest import ManifestError, load_manifest


def test_manifest_errors_name_the_field(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "tool.py").write_text("def run(a): return a\n")
    (folder / "tool.toml").write_text('name = "demo"\ndescription = "d"\ntimeout_s = -1\nlimit = 0\n'
                                      '[parameters]\ntype = "object"\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(folder / "tool.toml")
    assert "limit:" in str(info.value) and "timeout_s:" in str(info.value)
    (folder / "tool.toml").write_text('name = "demo"\ndescription = "d"\nsurprise = 1\n[parameters]\ntype = "object"\n')
    with pytest.raises(ManifestError, match="surprise"):
        load_manifest(folder / "tool.toml")
