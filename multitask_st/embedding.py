"""Keeping the sentence embedding while heads train: protection during training, and drift measured at every
evaluation.

Heads for classification, tagging or regression pull the shared encoder toward whatever their labels need; nothing in
their losses asks the pooled vector to keep meaning what it meant, so `encode` quietly gets worse (STS-B Spearman 82 ->
42-64 in the measurements of docs/RESULTS.md). The protections, measured there (`auto`, the default: isolation when a
task of the run trains the embedding, distillation otherwise):

- `distillation`: every batch of a task that does not itself train the embedding also pulls each of its
  sentences' current embedding toward the embedding the *initial* encoder gives it, `1 - cos(current, initial)`,
  from a frozen copy of the initial encoder run on the same batch (one extra forward pass, no backward). The heads
  stay free to reshape the token states and the directions they read, as long as the embedding of real sentences
  stays put.
- `l2sp`: L2-SP (Li et al., 2018), `weight/2 * ||θ - θ0||²` over the encoder's trainable weights: a pull toward the
  initial *weights*, wherever the change shows up.

- `isolation`: the heads of single-text tasks train only their own layers (their copies of the encoder's top
  layers, pooling, linear layers): their gradients stop where they read the shared encoder's states
  (`MultiTaskModel.forward(head_gradient_scale=0)`). The shared encoder then learns only from the tasks that train
  the embedding (similarity, pair classification, contrastive), or, in a run without any, not at all (it is
  frozen). A weight below 1 lets `1 - weight` of the heads' gradients through; without an embedding task that
  protects nothing (Adam rescales a gradient scaled down alone to full-size steps), and such a run warns.

`none` trains as before. LoRA (`train.py --lora_rank`) is a third option that limits how far the encoder can move.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import logging

from configuration_mtl import EMBEDDING_TASK_TYPES
from inference_mtl import PackedTokens
from modeling_mtl import labelled_mask

logger = logging.get_logger(__name__)

PROTECTIONS = ("auto", "distillation", "isolation", "l2sp", "none")
# The factor of each embedding protection in the loss, chosen on validation data (docs/RESULTS.md). Distillation,
# with SST-2 + TREC + WikiANN heads: 3 and 10 both kept the embedding (cosine 0.99, STS-B validation within 0.15 of
# the base model on each of 3 seeds), and 3, the weaker pull, left the token head +0.3 to +0.8 F1 more (every seed),
# the sentence heads the same within noise; 2 gained the token head nothing consistent (+1.3 / -0.3 / -0.1 against 3);
# an early run at 1 drifted to a mean cosine of 0.86.
# Isolation: the share of the heads' gradient kept out of the shared encoder; with STS-B similarity in the mix, 0.9
# kept the heads' validation scores within ~2 points of the distilled mix where 1.0 cost them 3-5.
DEFAULT_PROTECTION_WEIGHT = {"distillation": 3.0, "isolation": 0.9, "l2sp": 0.01, "none": 0.0}


def resolve_protection(method: str, tasks: list[dict[str, Any]]) -> str:
    """`auto` (the default): `isolation` when a task of the run trains the embedding (similarity, pair
    classification, contrastive), `distillation` otherwise; the choice is measured in docs/RESULTS.md."""
    if method != "auto":
        return method
    return "isolation" if any(task["type"] in EMBEDDING_TASK_TYPES for task in tasks) else "distillation"


def check_protection(method: str) -> None:
    if method not in PROTECTIONS:
        raise ValueError(f"embedding_protection '{method}' is not one of {list(PROTECTIONS)}")


def protection_setting(method: str, weight: float | None, tasks: list[dict[str, Any]]) -> tuple[str, float]:
    """The protection a run trains with, `(method, weight)`, as its training record states it: `auto` resolved,
    the weight defaulted (`DEFAULT_PROTECTION_WEIGHT`) and checked, weight 0 meaning `none`."""
    check_protection(method)
    resolved = resolve_protection(method, tasks)
    weight = DEFAULT_PROTECTION_WEIGHT[resolved] if weight is None else weight
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
        raise ValueError(f"protection_weight must be a number >= 0, got {weight!r}")
    if resolved == "isolation" and weight > 1:
        raise ValueError(
            f"protection_weight {weight!r} is out of range for isolation (the embedding protection in use"
            + (", chosen by 'auto' because a task trains the embedding" if method == "auto" else "")
            + "): it is the share of the heads' gradients kept out of the shared encoder, between 0 and 1"
        )
    return (resolved if weight > 0 else "none"), float(weight)


def unwrap(model: nn.Module) -> nn.Module:
    """The `MultiTaskModel` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def frozen_embedding_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of `model`'s encoder, pooling and projection (its heads dropped), to compute the
    initial embeddings with `teacher.embed(...)`. For a PEFT model the adapters are merged first: at the start of
    training they are zero, so the copy is the base encoder."""
    teacher = copy.deepcopy(model)
    if hasattr(teacher, "merge_and_unload"):
        teacher = teacher.merge_and_unload()
    teacher.heads = nn.ModuleDict()
    teacher.requires_grad_(False)
    return teacher.eval()


class EmbeddingProtection:
    """The protection term added to the training loss (see the module docstring).

    Args:
        model: the model at the start of training (unwrapped from DDP; a PEFT model is fine).
        method: one of `PROTECTIONS` (`auto` is resolved with `resolve_protection`).
        weight: factor of the term in the loss (default: `DEFAULT_PROTECTION_WEIGHT` of the resolved method).
        train_tasks: the names of the tasks that train in this run (default: every task of the model). `auto`,
            the rows left to an embedding task and the warnings look at these: a model's similarity head that gets
            no data in this run (`continue_training`) trains nothing.
    """

    def __init__(
        self, model: nn.Module, method: str, weight: float | None = None, train_tasks: list[str] | None = None
    ):
        tasks = unwrap(model).config.tasks
        if isinstance(train_tasks, str):
            raise ValueError(f"train_tasks must be a list of task names, got the string {train_tasks!r}")
        if train_tasks is not None:
            unknown = sorted(set(train_tasks) - {task["name"] for task in tasks})
            if unknown:
                raise ValueError(f"train_tasks {unknown} are not tasks of the model ({[t['name'] for t in tasks]})")
            tasks = [task for task in tasks if task["name"] in train_tasks]
        self.method, self.weight = protection_setting(method, weight, tasks)
        if method == "auto":
            logger.info(f"embedding_protection 'auto' -> '{self.method}' (multitask_st.embedding.resolve_protection)")
        self.embedding_tasks = [task["name"] for task in tasks if task["type"] in EMBEDDING_TASK_TYPES]
        if self.method == "isolation" and self.weight < 1 and not self.embedding_tasks:
            # Adam divides each parameter's step by the size of its own gradients, so scaling every gradient the
            # shared encoder gets by the same factor changes (almost) nothing: the factor only bites against the
            # gradients of an embedding task (tests/test_trainer.py measures it).
            logger.warning(
                f"embedding_protection 'isolation' with protection_weight {self.weight} and no task that trains the "
                "embedding protects (almost) nothing: the optimizer (Adam) rescales the heads' scaled-down gradients "
                "back to full-size steps. Use protection_weight 1 (a frozen shared encoder) or 'distillation'."
            )
        self.teacher = frozen_embedding_copy(unwrap(model)) if self.method == "distillation" else None
        self.initial = None
        if self.method == "l2sp":
            self.initial = {
                name: parameter.detach().clone()
                for name, parameter in unwrap(model).named_parameters()
                if name.startswith("backbone.") and parameter.requires_grad
            }

    @property
    def name(self) -> str:
        return {"distillation": "embedding_distillation", "l2sp": "l2sp"}.get(self.method, "none")

    @property
    def head_gradient_scale(self) -> float:
        """The share of the heads' gradients that reaches the shared encoder."""
        return 1.0 - self.weight if self.method == "isolation" else 1.0

    @property
    def isolates(self) -> bool:
        """Whether the shared encoder learns from the embedding tasks alone."""
        return self.head_gradient_scale == 0.0

    def to(self, device: torch.device) -> EmbeddingProtection:
        if self.teacher is not None:
            self.teacher.to(device)
        if self.initial is not None:
            self.initial = {name: value.to(device) for name, value in self.initial.items()}
        return self

    def loss(self, model: nn.Module, inputs: dict[str, Any], embeddings: torch.Tensor) -> torch.Tensor | None:
        """The weighted protection term for one micro-batch, or `None` when there is nothing to protect in it.

        Args:
            model: the model being trained (for L2-SP).
            inputs: the batch (`input_ids`, `attention_mask`, `labels`).
            embeddings: the batch's current embeddings from the forward pass, `(batch, [texts,] dim)`.
        """
        if self.method == "l2sp":
            squared = sum(
                (parameter - self.initial[name]).pow(2).sum()
                for name, parameter in unwrap(model).named_parameters()
                if name in self.initial
            )
            return 0.5 * self.weight * squared
        if self.method != "distillation":
            return None
        rows = self.rows_to_protect(inputs)
        if not rows.any():
            return None
        input_ids, attention_mask = inputs["input_ids"][rows], inputs["attention_mask"][rows]
        with torch.no_grad():
            target = self.teacher.embed(input_ids, attention_mask, normalize=True)
        current = F.normalize(embeddings[rows].float(), dim=-1)
        present = attention_mask.bool().any(-1)  # (rows[, texts]): absent texts of a mixed batch do not count
        distance = 1.0 - (current * target.float()).sum(-1)
        return self.weight * distance[present].mean()

    def rows_to_protect(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Rows with no label for a task that trains the embedding itself: those tasks move it on purpose."""
        first = inputs["input_ids"]
        rows = torch.ones(first.shape[0], dtype=torch.bool, device=first.device)
        for name in self.embedding_tasks:
            labels = inputs.get("labels", {}).get(name)
            if labels is not None:
                rows &= ~labelled_mask(labels).to(rows.device)
        return rows


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
