"""BM25 over skills' names and descriptions: how an agent finds one among many.

Small on purpose: a few hundred skills at most, re-indexed when the registry
reloads. Names count twice (a name is the densest description there is), and
``snake_case`` names are split into words.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

_WORD = re.compile(r"[a-z0-9]+")
K1 = 1.2
B = 0.75


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("_", " "))


class SkillIndex:
    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        """``entries``: (name, description) pairs."""
        self.names: list[str] = []
        self.docs: list[Counter[str]] = []
        for name, description in entries:
            words = tokens(name) * 2 + tokens(description)
            self.names.append(name)
            self.docs.append(Counter(words))
        self.lengths = [sum(doc.values()) for doc in self.docs]
        self.average = (sum(self.lengths) / len(self.docs)) if self.docs else 0.0
        frequency: Counter[str] = Counter()
        for doc in self.docs:
            frequency.update(doc.keys())
        count = len(self.docs)
        self.idf = {
            word: math.log(1 + (count - seen + 0.5) / (seen + 0.5))
            for word, seen in frequency.items()
        }

    def search(self, query: str, limit: int = 5) -> list[tuple[str, float]]:
        """The best matches, best first; skills sharing no word with the query are left out."""
        words = tokens(query)
        scored = []
        for name, doc, length in zip(self.names, self.docs, self.lengths, strict=True):
            score = 0.0
            for word in words:
                hits = doc.get(word, 0)
                if hits:
                    norm = K1 * (1 - B + B * length / (self.average or 1))
                    score += self.idf[word] * hits * (K1 + 1) / (hits + norm)
            if score > 0:
                scored.append((name, score))
        scored.sort(key=lambda item: (-item[1], item[0]))
        return scored[:limit]
