"""Ranking by meaning: entry vectors against the query's, calibrated against generic text.

Raw cosine similarity has no usable floor for the embedded chat model: its
mean-pooled vectors share one dominant direction, so any two texts look alike
(mean cosine 0.83 between unrelated conversation turns of
aios/bench/recall_set.py), and "peanut" came out "similar" to every entry of a
memory with nothing about peanuts. Two fixes, both calibrated once per
embedding model on `BACKGROUND`, 64 generic sentences about nothing in
particular (embedded through the same `llm.embed` as everything else, on the
first search that uses that model):

- *Centering.* Every vector has the background's mean vector subtracted and
  is scaled back to unit length before comparing ("all-but-the-top", Mu and
  Viswanath 2018). It removes the shared direction: recall@5 by meaning on
  the recall set rose from 0.84 to 0.91 with the default model.
- *A floor relative to the background.* An entry is a hit only if it is
  more similar to the query than generic text is: its similarity must be at
  least `FLOOR_Z` standard deviations above the mean similarity of the query
  to the background sentences (a z-score). The scale is the query's own, so
  the floor means the same for a one-word query as for a long one, and for
  any embedding model. With `FLOOR_Z` = 2 on the recall set: recall@5 by
  meaning 0.875 (0.91 with no floor); 13 off-topic questions ("What is the
  capital of France?", "peanut") find something in 18% of the 16
  conversations, against all of them with no floor; "peanut" finds nothing
  among three unrelated notes (z 1.2 at best). A floor of 2.5 would let 2%
  through but keep only 0.72 of the answers.

Vectors are kept per entry with the model that made them, and compared only
with a query vector from the same model: another model (or another LLM core
serving a different one) has other dimensions and another geometry, so its
vectors are recomputed rather than mixed.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

#: how many standard deviations above the query's similarity to generic text a hit must be
FLOOR_Z = 2.0

BACKGROUND: tuple[str, ...] = (
    'The meeting has been moved to Thursday afternoon.',
    'Can you send me the report by the end of the day?',
    'The bus was crowded this morning.',
    'Photosynthesis converts light into chemical energy.',
    'The invoice total includes tax and shipping.',
    'Please restart the server after the update finishes.',
    'The museum is closed on Mondays.',
    'He scored the winning goal in the final minute.',
    'The recipe calls for two cups of flour and a pinch of salt.',
    'Interest rates rose by a quarter of a point.',
    'The function returns None when the list is empty.',
    'Remember to back up your files before upgrading.',
    'The river flooded the lower fields after the storm.',
    'She painted the fence a bright shade of blue.',
    'What time does the pharmacy open on Sundays?',
    'The password must contain at least twelve characters.',
    'Our flight was delayed by three hours.',
    'The committee approved the new budget.',
    "I can't find my keys anywhere.",
    'The concert tickets sold out in minutes.',
    'Mount Everest is the highest mountain above sea level.',
    'The printer on the second floor is out of paper.',
    'Thanks for your help yesterday.',
    'The results will be announced next week.',
    'Turn left at the second traffic light.',
    'The baby finally fell asleep after midnight.',
    'This medication should be taken with food.',
    'The garden needs watering twice a week in summer.',
    'How do I convert a PDF into a text document?',
    'The election results were closer than expected.',
    'A thunderstorm is expected later tonight.',
    'The warranty covers parts but not labour.',
    'They opened a new bakery on the corner.',
    'The spreadsheet has a formula error in column D.',
    "Let's grab coffee sometime next week.",
    'The train to the airport leaves every twenty minutes.',
    'The novel was translated into thirty languages.',
    'Our team won the quiz at the pub.',
    'The software license expires at the end of the year.',
    'Could you please lower the volume?',
    'The hotel room had a view of the harbour.',
    'Wash the vegetables before chopping them.',
    'The stock price dropped after the announcement.',
    'The children built a sandcastle on the beach.',
    "I'm not sure what you mean.",
    'The package should arrive within three business days.',
    'The lecture covered the history of the Roman Empire.',
    'He forgot to charge his laptop.',
    'The soup needs a little more salt.',
    'The new policy takes effect on the first of the month.',
    'Okay, sounds good.',
    'The dentist appointment is at half past nine.',
    'Wind turbines generate electricity from moving air.',
    "The paint is still wet, so don't touch the wall.",
    'We are out of milk and bread.',
    'The match was postponed because of the rain.',
    'Please sign the form and return it to reception.',
    'The volcano last erupted two centuries ago.',
    'My computer keeps freezing when I open the browser.',
    'The parking lot is full on weekends.',
    'The team is hiring two new engineers.',
    'The moon orbits the earth about once a month.',
    'Could you remind me what we agreed on?',
    'The bridge will be closed for repairs until spring.',
)


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.where(norms == 0.0, 1.0, norms)


@dataclass(frozen=True)
class MeaningHit:
    key: Hashable
    similarity: float  # centered cosine, in [-1, 1]
    z: float  # standard deviations above the query's mean similarity to the background


class Calibration:
    """One embedding model's geometry: the background's mean (removed from every vector) and the
    background itself (the yardstick of the floor)."""

    def __init__(self, model: str, background: Sequence[Sequence[float]]) -> None:
        raw = np.asarray(background, dtype=np.float64)
        if raw.ndim != 2 or len(raw) < 8 or raw.shape[1] < 2:
            raise ValueError(f"calibrating {model!r} needs at least 8 background vectors of 2 or more dimensions")
        self.model = model
        self.dimensions = int(raw.shape[1])
        self.center = raw.mean(axis=0)
        self.background = _unit(raw - self.center)

    def project(self, vector: Sequence[float]) -> np.ndarray:
        """The vector as it is compared: centered, unit length, float32 (what the cache keeps)."""
        vec = np.asarray(vector, dtype=np.float64)
        if vec.shape != (self.dimensions,):
            raise ValueError(f"a vector of {vec.shape[0] if vec.ndim == 1 else vec.shape} dimensions for model "
                             f"{self.model!r}, which has {self.dimensions}")
        return _unit(vec - self.center).astype(np.float32)

    def rank(self, query: Sequence[float], candidates: Sequence[tuple[Hashable, np.ndarray]], limit: int,
             floor_z: float = FLOOR_Z, tiebreak: dict[Hashable, object] | None = None) -> list[MeaningHit]:
        """The candidates (key, projected vector) that clear the floor, most similar first; ties
        go to the smaller `tiebreak[key]` (default: the key), so equal data ranks the same every time."""
        if not candidates or limit <= 0:
            return []
        q = self.project(query).astype(np.float64)
        reference = self.background @ q
        mean, std = float(reference.mean()), float(reference.std()) or 1e-9
        sims = np.stack([vec for _, vec in candidates]).astype(np.float64) @ q
        hits = []
        for (key, _), sim in zip(candidates, sims.tolist()):
            z = (sim - mean) / std
            if z >= floor_z:
                hits.append(MeaningHit(key, round(sim, 6), round(z, 4)))
        order = tiebreak or {}
        hits.sort(key=lambda h: (-h.similarity, order.get(h.key, h.key)))
        return hits[:limit]


class VectorCache:
    """Entry vectors (projected by their model's Calibration) by (agent, id), for the entry's
    version (`updated`) and the model that made them; least recently used out beyond `budget_bytes`.
    A vector is recomputed when its entry changes, when another model asks, or after it left the cache."""

    ITEM_OVERHEAD = 200  # the key tuple, the item tuple, the array header (sys.getsizeof, rounded up)

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], tuple[float, str, np.ndarray]] = OrderedDict()

    def get(self, agent: str, entry_id: str, updated: float, model: str) -> np.ndarray | None:
        with self._lock:
            item = self._items.get((agent, entry_id))
            if item is None or item[0] != updated or item[1] != model:
                return None
            self._items.move_to_end((agent, entry_id))
            return item[2]

    def put(self, agent: str, entry_id: str, updated: float, model: str, vector: np.ndarray) -> None:
        size = vector.nbytes + self.ITEM_OVERHEAD
        with self._lock:
            old = self._items.pop((agent, entry_id), None)
            if old is not None:
                self.bytes -= old[2].nbytes + self.ITEM_OVERHEAD
            if size > self.budget:
                return
            self._items[(agent, entry_id)] = (updated, model, vector)
            self.bytes += size
            while self.bytes > self.budget:
                _, (_, _, gone) = self._items.popitem(last=False)
                self.bytes -= gone.nbytes + self.ITEM_OVERHEAD

    def __len__(self) -> int:
        return len(self._items)
