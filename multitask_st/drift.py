"""How far the sentence embedding has moved from where it started, measured without labels at every evaluation
(`MultiTaskTrainer` reports it as `eval_embedding/...` and warns when it drifts in a run that does not train it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from inference_mtl import PackedTokens

from .lora import unwrap


class EmbeddingDrift:
    """How far the embedding has moved from where it started, without labels: on a fixed sample of texts, the mean
    cosine between each text's initial and current embedding, and the overlap of each text's `k` nearest neighbours
    (within the sample) under the initial and the current embedding.

    Args:
        model: the model at the start of training.
        token_ids: the sample's texts as token id lists.
        k: neighbours compared per text.
    """

    def __init__(self, model: nn.Module, token_ids: list[list[int]], k: int = 10, batch_size: int = 64):
        self.tokens = PackedTokens.from_lists(token_ids)
        self.k = min(k, max(1, len(token_ids) - 1))
        self.batch_size = batch_size
        self.initial = self._embed(model)
        self.initial_neighbours = self._neighbours(self.initial)

    def _embed(self, model: nn.Module) -> np.ndarray:
        return unwrap(model).encode_tokens(self.tokens, batch_size=self.batch_size, normalize=True)

    def _neighbours(self, embeddings: np.ndarray) -> np.ndarray:
        similarity = embeddings @ embeddings.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argpartition(-similarity, self.k - 1, axis=1)[:, : self.k]

    def measure(self, model: nn.Module) -> dict[str, float]:
        current = self._embed(model)
        cosine = float(np.mean(np.sum(current * self.initial, axis=1)))
        neighbours = self._neighbours(current)
        overlap = np.mean(
            [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(neighbours, self.initial_neighbours)]
        )
        return {"cosine_to_initial": cosine, f"knn_overlap@{self.k}": float(overlap / self.k)}


def drift_sample(dataset: Any, size: int, seed: int = 0) -> list[list[int]]:
    """Up to `size` distinct texts (token id lists) of a processed split, every text of every row counted, drawn
    with a fixed seed so that every evaluation of a run measures the same texts."""
    texts = {tuple(ids) for row in dataset["input_ids"] for ids in row if ids}
    ordered = sorted(texts)
    if len(ordered) > size:
        chosen = np.random.default_rng(seed).choice(len(ordered), size=size, replace=False)
        ordered = [ordered[index] for index in sorted(chosen)]
    return [list(ids) for ids in ordered]
