"""An example user tool: plain Python, no AIOS import, runs in a confined worker."""
import collections
import re


def run(args):
    text = args["text"]
    words = re.findall(r"[\w']+", text.lower())
    top = collections.Counter(words).most_common(args.get("top", 5))
    return {"words": len(words), "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
            "characters": len(text), "top": [{"word": w, "count": n} for w, n in top]}
