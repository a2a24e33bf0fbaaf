"""Essay writing: one long generation (256 tokens), streamed. The request a fair scheduler must not let hog the model."""
from __future__ import annotations

from aios.agents.common import LONG_ANSWER_SAMPLING, agent_client, report, token_printer


def main() -> None:
    client, args = agent_client("essayist", __doc__)
    reply = client.chat([{"role": "user", "content": "Write an essay about the history of painting."}],
                        max_tokens=256, stop=[], on_token=token_printer(args.name, args.stream),
                        **LONG_ANSWER_SAMPLING)
    report(args.name, "write an essay about the history of painting", reply)


if __name__ == "__main__":
    main()
