"""The scheduler's settings: the `[scheduler]` table of the configuration.

A leaf module (pydantic and the standard library only), so that the
configuration loader can validate `[scheduler]` without importing the
policies, and the policies can take their settings without importing the
configuration loader: the two used to import each other.

`POLICY_NAMES` is the list the configuration accepts; `aios.scheduler.policies`
maps each name to its class (a unit test checks the two agree).
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["POLICY_NAMES", "SchedulerConfig"]

#: the scheduling policies `[scheduler] policy` may name (classes in `aios.scheduler.policies`)
POLICY_NAMES: tuple[str, ...] = ("fifo", "rr", "las")


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = "fifo"
    time_slice_tokens: int = Field(default=32, ge=1)
    weights: dict[str, float] = Field(default_factory=dict, description="per-agent weights for fair-share policies")
    max_queued_per_agent: int = Field(default=1000, ge=0,
                                      description="queued requests one agent may have (0: no limit); "
                                                  "more are refused with a retryable OVERLOADED")
    max_requeues: int = Field(default=2, ge=0, description="times a request is re-queued after its manager died")
    admission: str | None = Field(default=None, description="extra admission step, 'package.module:Class'")
    admission_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(f"unknown scheduling policy {v!r}; choose one of {sorted(POLICY_NAMES)}")
        return v

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {a: w for a, w in v.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"weights must be positive numbers; not {bad}")
        return v
