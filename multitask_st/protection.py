"""Keeping the sentence embedding while heads train (its drift is measured by `multitask_st.drift`).

Heads for classification, tagging or regression pull the shared encoder toward whatever their labels need; nothing in
their losses asks the pooled vector to keep meaning what it meant, so `encode` quietly gets worse (docs/RESULTS.md
measures how much). The protections, measured there (`auto`, the default: isolation when a task of the run trains
the embedding, distillation otherwise):

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
  the embedding (`Task.trains_embedding`: similarity, pair classification, contrastive), or, in a run without any,
  not at all (it is frozen). A weight below 1 lets `1 - weight` of the heads' gradients through; without an
  embedding task that protects nothing (Adam rescales a gradient scaled down alone to full-size steps), and such a
  run warns.

`none` trains as before. LoRA (`train.py --lora_rank`) is a third option that limits how far the encoder can move.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import logging

from layers_mtl import labelled_mask
from tasks_mtl import make_task
from validation_mtl import InputError, check_number

from .arguments import PROTECTIONS, check_choice
from .lora import unwrap

logger = logging.get_logger(__name__)

# The factor of each embedding protection in the loss (for isolation: the share of the heads' gradient kept out of
# the shared encoder), chosen on validation data: docs/TRAINING.md gives the reasons and the runs behind each.
DEFAULT_PROTECTION_WEIGHT = {"distillation": 3.0, "isolation": 0.9, "l2sp": 0.01, "none": 0.0}


def resolve_protection(method: str, tasks: list[dict[str, Any]]) -> str:
    """`auto` (the default): `isolation` when a task of the run trains the embedding (similarity, pair
    classification, contrastive), `distillation` otherwise; the choice is measured in docs/RESULTS.md."""
    if method != "auto":
        return method
    return "isolation" if any(make_task(task).trains_embedding for task in tasks) else "distillation"


def check_protection(method: str) -> None:
    check_choice("embedding_protection", method, PROTECTIONS)


def protection_setting(method: str, weight: float | None, tasks: list[dict[str, Any]]) -> tuple[str, float]:
    """The protection a run trains with, `(method, weight)`, as its training record states it: `auto` resolved,
    the weight defaulted (`DEFAULT_PROTECTION_WEIGHT`) and checked, weight 0 meaning `none`."""
    check_protection(method)
    resolved = resolve_protection(method, tasks)
    weight = DEFAULT_PROTECTION_WEIGHT[resolved] if weight is None else weight
    check_number("protection_weight", weight, 0)  # finite: an infinite weight is all protection, no task
    if resolved == "isolation" and weight > 1:
        raise InputError(
            f"protection_weight {weight!r} is out of range for isolation (the embedding protection in use"
            + (", chosen by 'auto' because a task trains the embedding" if method == "auto" else "")
            + "): it is the share of the heads' gradients kept out of the shared encoder, between 0 and 1"
        )
    return (resolved if weight > 0 else "none"), float(weight)


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
            raise InputError(f"train_tasks must be a list of task names, got the string {train_tasks!r}")
        if train_tasks is not None:
            unknown = sorted(set(train_tasks) - {task["name"] for task in tasks})
            if unknown:
                raise InputError(f"train_tasks {unknown} are not tasks of the model ({[t['name'] for t in tasks]})")
            tasks = [task for task in tasks if task["name"] in train_tasks]
        self.method, self.weight = protection_setting(method, weight, tasks)
        if method == "auto":
            logger.info(f"embedding_protection 'auto' -> '{self.method}' (multitask_st.protection.resolve_protection)")
        self.embedding_tasks = [task["name"] for task in tasks if make_task(task).trains_embedding]
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
        token_type_ids = inputs["token_type_ids"][rows] if inputs.get("token_type_ids") is not None else None
        with torch.no_grad():  # the initial encoder sees what the trained one saw, segments included
            target = self.teacher.embed(input_ids, attention_mask, normalize=True, token_type_ids=token_type_ids)
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
