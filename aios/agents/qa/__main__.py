"""Question answering: short factual questions, short answers (a few tokens each)."""
from __future__ import annotations

from aios.agents.common import agent_client, report, token_printer

QUESTIONS = [
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    "What is the chemical symbol for gold?",
]


def main() -> None:
    client, args = agent_client("qa", __doc__)
    for q in QUESTIONS:
        reply = client.chat([{"role": "user", "content": f"Answer in a few words. {q}"}],
                            max_tokens=16, temperature=0.0, stop=["\n"], on_token=token_printer(args.name, args.stream))
        report(args.name, q, reply)


if __name__ == "__main__":
    main()
