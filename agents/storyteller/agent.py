"""Storytelling: one long generation, streamed. It is the request a fair scheduler must not let hog the model."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
from common import agent_client, report  # noqa: E402


def main() -> None:
    client, args = agent_client("storyteller", __doc__)
    pieces: list[str] = []
    reply = client.chat([{"role": "user", "content": "Write a long story about a robot who learns to paint."}],
                        max_tokens=256, temperature=0.0, stop=[], on_token=pieces.append)
    report(args.name, "write a long story", reply)


if __name__ == "__main__":
    main()
