"""A small word tokenizer, so text benchmarks need no download.

Lowercase, split on a word regex, and map words to ids with a vocabulary
built from the train split only (val and test words unseen in training are
``<unk>``, as they would be for a deployed model). Sequences are cut or
padded to a fixed length.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import numpy as np

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
MAX_VOCAB = 30000  # equals models.text.VOCAB_SIZE, the text encoder's embedding table
WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    """Lowercased words, numbers and single punctuation marks."""
    return WORD.findall(text.lower())


class Tokenizer:
    def __init__(self, vocabulary: list[str], max_length: int):
        self.vocabulary = vocabulary
        self.ids = {word: k for k, word in enumerate(vocabulary)}
        self.max_length = max_length

    @classmethod
    def build(
        cls, texts: Iterable[str], max_length: int, min_count: int = 1, max_vocab: int = MAX_VOCAB
    ) -> "Tokenizer":
        """Vocabulary of the words seen at least ``min_count`` times, most frequent first (ties by word)."""
        counts = Counter(word for text in texts for word in words(text))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK, *kept[: max_vocab - 2]], max_length)

    def encode(self, text: str) -> np.ndarray:
        ids = [self.ids.get(word, UNK_ID) for word in words(text)][: self.max_length]
        out = np.full(self.max_length, PAD_ID, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def encode_all(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.max_length), dtype=np.int64)
        return np.stack([self.encode(t) for t in texts])
