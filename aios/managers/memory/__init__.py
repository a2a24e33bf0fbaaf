"""The memory manager's engine: per-agent memory entries in RAM within a byte budget.

- radix.py: a radix tree, so entries that share a prefix share its bytes (compression).
- lruk.py: LRU-K victim selection for eviction, and the histories of evicted entries (ghosts).
- bm25.py: keyword ranking of the entries in RAM, scored on the fly over the tree.
- meaning.py: ranking by meaning (embeddings calibrated against generic text, a floor, the vector cache).
- fusion.py: merging the keyword ranking and the ranking by meaning: the more confident one leads.
- store.py: `MemoryStore`, the engine the manager process wraps (ops, budget, eviction, swap-in).
- records.py: `MemoryRecord` (an entry as callers see it) and `Backing` (where entries persist).
- limits.py: what an entry may hold, checked before anything is written.
- sizing.py: what objects really cost in RAM (measured with `python -m aios.bench.memory_engine calibrate`
  and `... rss`).

The benchmarks and their workloads live in aios/bench/ (memory_engine.py, memory_workloads.py; recall.py and
recall_set.py for search quality).
"""
from aios.managers.memory.limits import Limits
from aios.managers.memory.records import Backing, MemoryRecord
from aios.managers.memory.store import MemoryStore

__all__ = ["Backing", "Limits", "MemoryStore", "MemoryRecord"]
