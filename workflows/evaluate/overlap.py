"""Held-out means held out: exact and near-duplicate overlap between eval prompts and training
prompts (pure).

Texts are normalized (case, Unicode form, punctuation, whitespace); an *exact* overlap is the
same normalized text, a *near* one shares word trigrams with Jaccard similarity at or above a
threshold (0.5 by default: one changed word in a ten-word prompt still counts). The eval set is
the small side, so it is indexed and the training prompts stream past it: memory stays flat in
the training set's size and each training prompt costs one lookup per trigram.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

_WORD = re.compile(r"[\w']+")


def normalize(text: str) -> str:
    """Lower case, NFKC, words only, single spaces."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text or "").lower()))


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Word ``n``-grams of the normalized text (the whole text when it is shorter than ``n`` words)."""
    words = normalize(text).split()
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


@dataclass(frozen=True)
class Overlap:
    eval_id: str
    train_id: str
    kind: str  # "exact" | "near"
    similarity: float  # trigram Jaccard (1.0 for exact)


class OverlapIndex:
    """The eval prompts, indexed by trigram; ``scan`` streams training prompts past them."""

    def __init__(self, eval_prompts: dict[str, str], n: int = 3):
        self.n = n
        self.exact = {normalize(t): i for i, t in eval_prompts.items()}
        self.sizes = {i: len(s) for i, s in ((i, shingles(t, n)) for i, t in eval_prompts.items())}
        self.by_shingle: dict[str, list[str]] = {}
        for i, t in eval_prompts.items():
            for s in shingles(t, n):
                self.by_shingle.setdefault(s, []).append(i)

    def scan(self, train_prompts: Iterable[tuple[str, str]], threshold: float = 0.5) -> list[Overlap]:
        """Every (eval, training) pair that is exact or at least ``threshold`` similar."""
        found = []
        for train_id, text in train_prompts:
            hit = self.exact.get(normalize(text))
            if hit is not None:
                found.append(Overlap(hit, train_id, "exact", 1.0))
            mine = shingles(text, self.n)
            shared = Counter(i for s in mine for i in self.by_shingle.get(s, ()))
            for eval_id, k in shared.items():
                if eval_id == hit:
                    continue
                sim = k / (len(mine) + self.sizes[eval_id] - k)
                if sim >= threshold:
                    found.append(Overlap(eval_id, train_id, "near", round(sim, 4)))
        return found


def summarize(found: list[Overlap], n_eval: int) -> dict:
    """Counts for the report: eval prompts with an exact / near overlap, and the worst pairs."""
    exact = {o.eval_id for o in found if o.kind == "exact"}
    near = {o.eval_id for o in found if o.kind == "near"} - exact
    worst = sorted(found, key=lambda o: -o.similarity)[:10]
    return {"eval_prompts": n_eval, "exact": len(exact), "near": len(near),
            "worst": [o.__dict__ for o in worst]}
