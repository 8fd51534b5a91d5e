"""Policies replayed over stored states instead of llama.cpp: the same `Document` bookkeeping (valid depths,
re-decodes, token-layers, operations) with the computation served from features extracted once.

Calibration uses it to try hundreds of parameter settings on a calibration split in seconds; the unit tests
of the policies use it with hand-made states. Stored states come from one decode per sentence, so a
replayed one-pass read (several sentences in one decode) differs from the live one only by llama.cpp's
batching noise (NOTES.md §2).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .engine import Document, StopRule, _Sentence


class ReplayDocument(Document):
    """A document whose k-th sentence has the stored mean states `states[k]` ([n_layer, n_embd])."""

    def __init__(self, states: np.ndarray, tokens: Sequence[int]):
        super().__init__(states.shape[2], 0, int(np.sum(tokens)))
        self.states = states
        self.sentences = [range(int(n)) for n in tokens]  # what a policy is given to read

    def _forget(self, position: int) -> None:
        pass

    def _compute(
        self,
        sentences: list[_Sentence],
        first_index: int,
        depth: int,
        layers: tuple[int, ...],
        stop: StopRule | None,
    ) -> tuple[int, np.ndarray, np.ndarray]:
        block = self.states[first_index : first_index + len(sentences)]
        reached = depth
        if stop is not None:
            reached = next((layer + 1 for layer in layers if stop(layer, block[:, layer])), depth)
        read = [layer for layer in layers if layer < reached]
        means = block[:, read]
        return reached, means, np.full_like(means, np.nan)  # last-token states are not stored
