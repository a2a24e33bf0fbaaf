"""Summarising: condense a paragraph into one sentence (medium-length output)."""
from __future__ import annotations

from aios.agents.common import LONG_ANSWER_SAMPLING, agent_client, report, token_printer

TEXT = (
    "An operating system manages a computer's hardware and software resources and provides common services "
    "for programs. Time-sharing operating systems schedule tasks for efficient use of the system, and may also "
    "include accounting software for allocation of processor time, mass storage, and other resources. "
    "For hardware functions such as input, output and memory allocation, the operating system acts as an "
    "intermediary between programs and the computer hardware."
)


def main() -> None:
    client, args = agent_client("summarizer", __doc__)
    reply = client.chat([{"role": "user", "content": f"Summarize this text in one sentence.\n\n{TEXT}"}],
                        max_tokens=64, on_token=token_printer(args.name, args.stream), **LONG_ANSWER_SAMPLING)
    report(args.name, "summarize a paragraph about operating systems", reply)


if __name__ == "__main__":
    main()
