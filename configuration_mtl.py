"""Configuration of the multi-task sentence transformer.

This file is copied next to the weights by `save_pretrained`, so it must stay self-contained: it imports
only `transformers` (and the standard library), never the rest of this project.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "weighted_mean", "last_token", "attention")
TASK_TYPES = ("classification", "multi_label_classification", "token_classification", "regression")
HEAD_TYPES = ("linear", "mlp")
_TASK_KEYS = {"name", "type", "labels", "head", "loss_weight", "threshold"}
_HEAD_KEYS = {"type", "hidden_size", "activation", "dropout"}
_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _normalize_head(task_name: str, head: Any, default_dropout: float) -> dict[str, Any]:
    if head is None:
        head = {}
    elif isinstance(head, str):
        head = {"type": head}
    elif not isinstance(head, dict):
        raise ValueError(f"task '{task_name}': `head` must be a dict, a head type string or None, got {head!r}")
    unknown = set(head) - _HEAD_KEYS
    if unknown:
        raise ValueError(f"task '{task_name}': unknown head keys {sorted(unknown)}; allowed: {sorted(_HEAD_KEYS)}")
    head_type = head.get("type", "linear")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"task '{task_name}': head type '{head_type}' is not one of {list(HEAD_TYPES)}")
    dropout = head.get("dropout", default_dropout)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"task '{task_name}': head dropout must be a number in [0, 1), got {dropout!r}")
    normalized: dict[str, Any] = {"type": head_type, "dropout": float(dropout)}
    if head_type == "mlp":
        hidden_size = head.get("hidden_size")
        if hidden_size is not None and (not isinstance(hidden_size, int) or hidden_size <= 0):
            raise ValueError(f"task '{task_name}': head hidden_size must be a positive int, got {hidden_size!r}")
        activation = head.get("activation", "gelu")
        if activation not in ACT2FN:
            raise ValueError(
                f"task '{task_name}': head activation '{activation}' is unknown; allowed: {sorted(ACT2FN)}"
            )
        normalized.update(hidden_size=hidden_size, activation=activation)
    elif "hidden_size" in head or "activation" in head:
        raise ValueError(f"task '{task_name}': hidden_size/activation only apply to an 'mlp' head, not 'linear'")
    return normalized


def normalize_task(task: dict[str, Any], default_dropout: float = 0.1) -> dict[str, Any]:
    """Validate one task description and return it with every default filled in.

    Args:
        task (`dict`):
            `name` (str), `type` (one of `TASK_TYPES`), `labels` (list of label names; for `regression` the
            names of the predicted values, default `["score"]`), optional `head` (`"linear"`, `"mlp"` or a
            dict with `type`, `hidden_size`, `activation`, `dropout`), `loss_weight` (float >= 0, default 1)
            and, for multi-label tasks, `threshold` (probability above which a label is predicted, default 0.5).
        default_dropout (`float`): head dropout used when the task does not set one.
    """
    if not isinstance(task, dict):
        raise ValueError(f"each task must be a dict, got {type(task).__name__}: {task!r}")
    unknown = set(task) - _TASK_KEYS
    if unknown:
        raise ValueError(f"task {task.get('name')!r}: unknown keys {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}")
    name = task.get("name")
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise ValueError(f"task name must be a non-empty string of letters, digits, '_' or '-', got {name!r}")
    task_type = task.get("type", "classification")
    if task_type not in TASK_TYPES:
        raise ValueError(f"task '{name}': type '{task_type}' is not one of {list(TASK_TYPES)}")

    labels = task.get("labels")
    if task_type == "regression" and labels is None:
        labels = ["score"]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"task '{name}': `labels` must be a list of label names (strings), got {labels!r}")
    labels = list(labels)
    minimum = 1 if task_type in ("regression", "multi_label_classification") else 2
    if len(labels) < minimum:
        raise ValueError(f"task '{name}': a {task_type} task needs at least {minimum} labels, got {labels}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"task '{name}': duplicate labels {duplicates}")

    loss_weight = task.get("loss_weight", 1.0)
    if not isinstance(loss_weight, (int, float)) or isinstance(loss_weight, bool) or loss_weight < 0:
        raise ValueError(f"task '{name}': loss_weight must be a number >= 0, got {loss_weight!r}")

    normalized = {
        "name": name,
        "type": task_type,
        "labels": labels,
        "head": _normalize_head(name, task.get("head"), default_dropout),
        "loss_weight": float(loss_weight),
    }
    if task_type == "multi_label_classification":
        threshold = task.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"task '{name}': threshold must be in (0, 1), got {threshold!r}")
        normalized["threshold"] = float(threshold)
    elif "threshold" in task:
        raise ValueError(f"task '{name}': threshold only applies to multi_label_classification tasks")
    return normalized


class MultiTaskConfig(PretrainedConfig):
    r"""
    Configuration of a [`MultiTaskModel`]: a transformer encoder (the backbone), a pooling step that turns its
    token states into one sentence embedding, an optional projection and L2 normalisation, and one small head
    per task. The backbone's own configuration is nested, so a model rebuilds from this config alone.

    Args:
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            Configuration of the encoder (any model `AutoModel` can build: BERT, DistilBERT, RoBERTa, MiniLM, ...).
            A dict must carry `model_type`. Defaults to a BERT config with the all-MiniLM-L6-v2 shape.
        pooling (`str`, *optional*, defaults to `"mean"`):
            How token states become a sentence embedding; one of `POOLING_MODES`. All modes ignore padding.
        projection_dim (`int`, *optional*):
            If set, a linear layer maps the pooled vector to this size; the embedding and every sequence-level
            head then use the projected vector.
        projection_activation (`str`, *optional*):
            Activation after the projection (e.g. `"tanh"`); `None` keeps it linear.
        normalize (`bool`, *optional*, defaults to `False`):
            L2-normalise the sentence embedding returned by `forward`/`encode` (heads always read the
            un-normalised vector, so normalisation never limits what a classifier can learn).
        max_seq_length (`int`, *optional*, defaults to 256):
            Texts longer than this many tokens (special tokens included) are truncated.
        tasks (`list[dict]`, *optional*):
            The prediction tasks; see [`normalize_task`] for the keys. Task names must be unique.
        head_dropout (`float`, *optional*, defaults to 0.1):
            Dropout before each head, unless the task's head sets its own.
    """

    model_type = "multitask_sentence_transformer"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict | None = None,
        pooling: str = "mean",
        projection_dim: int | None = None,
        projection_activation: str | None = None,
        normalize: bool = False,
        max_seq_length: int = 256,
        tasks: list[dict] | None = None,
        head_dropout: float = 0.1,
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = {
                "model_type": "bert",
                "hidden_size": 384,
                "num_hidden_layers": 6,
                "num_attention_heads": 12,
                "intermediate_size": 1536,
            }
        if isinstance(backbone_config, dict):
            backbone_config = copy.deepcopy(backbone_config)
            if "model_type" not in backbone_config:
                raise ValueError("backbone_config: a dict backbone config needs a 'model_type' key (e.g. 'bert')")
            backbone_config = AutoConfig.for_model(**backbone_config)
        if not isinstance(backbone_config, PretrainedConfig):
            raise ValueError(f"backbone_config must be a PretrainedConfig or dict, got {type(backbone_config)}")
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling '{pooling}' is not one of {list(POOLING_MODES)}")
        if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim <= 0):
            raise ValueError(f"projection_dim must be a positive int or None, got {projection_dim!r}")
        if projection_activation is not None and projection_activation not in ACT2FN:
            raise ValueError(f"projection_activation '{projection_activation}' is unknown; allowed: {sorted(ACT2FN)}")
        if not isinstance(max_seq_length, int) or max_seq_length < 2:
            raise ValueError(f"max_seq_length must be an int >= 2, got {max_seq_length!r}")
        limit = getattr(backbone_config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_seq_length > limit:
            raise ValueError(f"max_seq_length={max_seq_length} exceeds the backbone's max_position_embeddings={limit}")
        if not isinstance(head_dropout, (int, float)) or not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout must be a number in [0, 1), got {head_dropout!r}")

        normalized_tasks = [normalize_task(task, head_dropout) for task in (tasks or [])]
        names = [task["name"] for task in normalized_tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names {duplicates}: every task needs its own name")

        self.backbone_config = backbone_config
        self.pooling = pooling
        self.projection_dim = projection_dim
        self.projection_activation = projection_activation
        self.normalize = bool(normalize)
        self.max_seq_length = max_seq_length
        self.tasks = normalized_tasks
        self.head_dropout = float(head_dropout)
        super().__init__(**kwargs)

    # Convenience views over `tasks`; the list itself stays the single source of truth.
    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks]

    def get_task(self, name: str) -> dict[str, Any]:
        for task in self.tasks:
            if task["name"] == name:
                return task
        raise KeyError(f"unknown task '{name}'; this model's tasks are {self.task_names}")

    def task_id2label(self, name: str) -> dict[int, str]:
        return dict(enumerate(self.get_task(name)["labels"]))

    def task_label2id(self, name: str) -> dict[str, int]:
        return {label: index for index, label in enumerate(self.get_task(name)["labels"])}

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim or self.backbone_config.hidden_size


__all__ = ["MultiTaskConfig", "normalize_task", "POOLING_MODES", "TASK_TYPES", "HEAD_TYPES"]
