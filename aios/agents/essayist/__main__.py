"""Essay writing: one long generation (256 tokens), streamed. The request a fair scheduler must not let hog the model."""
from __future__ import annotations

from aios.agents.common import agent_client, report


def main() -> None:
    client, args = agent_client("essayist", __doc__)
    pieces: list[str] = []
    reply = client.chat([{"role": "user", "content": "Write an essay about the history of painting."}],
                        max_tokens=256, temperature=0.0, stop=[], on_token=pieces.append)
    report(args.name, "write an essay about the history of painting", reply)


if __name__ == "__main__":
    main()
