"""OllamaBackend without a server: the model name is checked before anything is sent. Against a
scripted fake Ollama server it is tested in tests/system/test_ollama_backend.py."""
from __future__ import annotations

import pytest

from aios.managers.llm.backends.ollama_backend import OllamaBackend
from aios.managers.llm.types import BackendError
from tests.support.llm_driver import q

MODEL = "fake-gemma:270m"


def test_model_name_is_checked() -> None:
    b = OllamaBackend("http://127.0.0.1:9", MODEL)
    with pytest.raises(BackendError) as ei:
        b.start(q(model="other"))
    assert ei.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ValueError):
        OllamaBackend("http://127.0.0.1:9")
