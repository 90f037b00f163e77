"""Configuration of the multi-task sentence transformer.

This file is copied next to the weights by `save_pretrained`, so it must stay self-contained: it imports
only `transformers` (and the standard library), never the rest of this project.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "weighted_mean", "last_token", "attention")
# Tasks on one text per row. Sequence-level heads read the pooled sentence vector, token heads the token states.
TEXT_TASK_TYPES = ("classification", "multi_label_classification", "token_classification", "regression")
# The single-text tasks whose heads read a sentence (the pooled vector, or their own pooling), not token states.
SEQUENCE_TASK_TYPES = ("classification", "multi_label_classification", "regression")
# Tasks on two (or three) texts per row, each embedded by the shared encoder: these train the embedding itself.
PAIR_TASK_TYPES = ("similarity", "pair_classification", "contrastive")
TASK_TYPES = TEXT_TASK_TYPES + PAIR_TASK_TYPES
EMBEDDING_TASK_TYPES = PAIR_TASK_TYPES
# linear / mlp read a vector; transformer first runs a fresh transformer layer over the token states (an adapter
# of the task's own), for token tasks and for sentence heads with their own pooling.
HEAD_TYPES = ("linear", "mlp", "transformer")
SIMILARITY_LOSSES = ("cosent", "cosine_mse")
PAIR_FEATURES = ("u", "v", "|u-v|", "u*v")
# Keys every task may have, then the keys that only some task types take.
_COMMON_KEYS = {"name", "type", "labels", "head", "loss_weight"}
_TYPE_KEYS = {
    "multi_label_classification": {"threshold"},
    "similarity": {"loss", "score_range", "scale"},
    "pair_classification": {"pair_features"},
    "contrastive": {"scale", "gather_across_processes"},
}
HEADLESS_TASK_TYPES = ("similarity", "contrastive")  # scored on the embeddings alone: no head, no labels
_HEAD_KEYS = {"type", "hidden_size", "activation", "dropout", "pooling", "layers"}
# What a sentence-level head reads: the shared sentence vector (the embedding, before normalisation), or its own
# learned attention pooling of the token states, which leaves the embedding to the shared pooling.
HEAD_POOLINGS = ("shared", "attention")
_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# Names that would shadow `nn.Module` attributes if used as `nn.ModuleDict` keys.
# "embedding" names the embedding's own metrics (`eval_embedding/...`).
_RESERVED_TASK_NAMES = {"training", "forward", "type", "to", "train", "eval", "state_dict", "parameters", "embedding"}


def backbone_depth(backbone_config: Any) -> int | None:
    """Number of transformer layers of a backbone config (BERT-style `num_hidden_layers`, DistilBERT's `n_layers`)."""
    return getattr(backbone_config, "num_hidden_layers", None) or getattr(backbone_config, "n_layers", None)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    if not _number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"task '{task_name}': head dropout must be a number in [0, 1), got {dropout!r}")
    normalized: dict[str, Any] = {"type": head_type, "dropout": float(dropout)}
    layers = head.get("layers", 0)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise ValueError(f"task '{task_name}': head layers must be an int >= 0, got {layers!r}")
    if layers:
        normalized["layers"] = layers
    pooling = head.get("pooling", "shared")
    if pooling not in HEAD_POOLINGS:
        raise ValueError(f"task '{task_name}': head pooling '{pooling}' is not one of {list(HEAD_POOLINGS)}")
    if pooling != "shared":
        normalized["pooling"] = pooling
    if head_type in ("mlp", "transformer"):
        hidden_size = head.get("hidden_size")
        if hidden_size is not None and (
            not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0
        ):
            raise ValueError(f"task '{task_name}': head hidden_size must be a positive int, got {hidden_size!r}")
        activation = head.get("activation", "gelu")
        if activation not in ACT2FN:
            raise ValueError(
                f"task '{task_name}': head activation '{activation}' is unknown; allowed: {sorted(ACT2FN)}"
            )
        normalized.update(hidden_size=hidden_size, activation=activation)
    elif "hidden_size" in head or "activation" in head:
        raise ValueError(f"task '{task_name}': hidden_size/activation only apply to 'mlp' / 'transformer' heads")
    return normalized


def _normalize_labels(name: str, task_type: str, labels: Any) -> list[str]:
    if task_type in HEADLESS_TASK_TYPES:
        if labels not in (None, [], ["score"]):
            raise ValueError(f"task '{name}': a {task_type} task has no label names (it scores embeddings)")
        return []
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
    return labels


def _type_options(name: str, task_type: str, task: dict[str, Any]) -> dict[str, Any]:
    """The options only some task types take, validated, with their defaults."""
    if task_type == "multi_label_classification":
        threshold = task.get("threshold", 0.5)
        if not _number(threshold) or not 0.0 < threshold < 1.0:
            raise ValueError(f"task '{name}': threshold must be in (0, 1), got {threshold!r}")
        return {"threshold": float(threshold)}
    options: dict[str, Any] = {}
    if task_type in HEADLESS_TASK_TYPES:
        # 20 is sentence-transformers' default for both CoSENT and multiple-negatives ranking: cosines in [-1, 1]
        # become logits in [-20, 20], sharp enough for a softmax over in-batch candidates.
        scale = task.get("scale", 20.0)
        if not _number(scale) or scale <= 0:
            raise ValueError(f"task '{name}': scale must be a number > 0, got {scale!r}")
        options["scale"] = float(scale)
    if task_type == "similarity":
        loss = task.get("loss", "cosent")
        if loss not in SIMILARITY_LOSSES:
            raise ValueError(f"task '{name}': loss '{loss}' is not one of {list(SIMILARITY_LOSSES)}")
        score_range = task.get("score_range", [0.0, 1.0])
        if (
            not isinstance(score_range, (list, tuple))
            or len(score_range) != 2
            or not all(_number(v) for v in score_range)
            or not score_range[0] < score_range[1]
        ):
            raise ValueError(f"task '{name}': score_range must be [low, high] with low < high, got {score_range!r}")
        options.update(loss=loss, score_range=[float(score_range[0]), float(score_range[1])])
    elif task_type == "pair_classification":
        features = task.get("pair_features", ["u", "v", "|u-v|"])
        if (
            not isinstance(features, (list, tuple))
            or not features
            or any(feature not in PAIR_FEATURES for feature in features)
            or len(set(features)) != len(features)
        ):
            raise ValueError(
                f"task '{name}': pair_features must be a non-empty list of distinct items of {list(PAIR_FEATURES)}, "
                f"got {features!r}"
            )
        options["pair_features"] = list(features)
    elif task_type == "contrastive":
        gather = task.get("gather_across_processes", False)
        if not isinstance(gather, bool):
            raise ValueError(f"task '{name}': gather_across_processes must be true or false, got {gather!r}")
        options["gather_across_processes"] = gather
    return options


def normalize_task(task: dict[str, Any], default_dropout: float = 0.1) -> dict[str, Any]:
    """Validate one task description and return it with every default filled in.

    Args:
        task (`dict`):
            Every task: `name` (str), `type` (one of `TASK_TYPES`, default `"classification"`), `loss_weight`
            (float >= 0, default 1).
            Tasks with a head (all but `similarity` and `contrastive`): `labels` (label names; for `regression` the
            names of the predicted values, default `["score"]`) and `head` (`"linear"`, `"mlp"` or a dict with
            `type`, `hidden_size`, `activation`, `dropout`, and for sentence-level tasks `pooling`: `"shared"`, the
            default, reads the sentence embedding's pooled vector; `"attention"` gives the head its own learned
            attention pooling of the token states). Type `"transformer"` (token tasks, or with `pooling:
            attention`) runs a fresh transformer layer of the task's own over the token states first.
            `multi_label_classification`: `threshold` (probability above which a label is predicted, default 0.5).
            `similarity`: `loss` (`"cosent"`, default, or `"cosine_mse"`), `score_range` (`[low, high]` of the
            gold scores, default `[0, 1]`), `scale` (CoSENT's, default 20).
            `pair_classification`: `pair_features` (what the head reads of the two embeddings u, v: any of
            `"u"`, `"v"`, `"|u-v|"`, `"u*v"`; default `["u", "v", "|u-v|"]`, the SBERT classifier).
            `contrastive`: `scale` (cosine -> logit factor, default 20), `gather_across_processes` (in-batch
            negatives from every process under DDP, default false).
        default_dropout (`float`): head dropout used when the task does not set one.
    """
    if not isinstance(task, dict):
        raise ValueError(f"each task must be a dict, got {type(task).__name__}: {task!r}")
    name = task.get("name")
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise ValueError(f"task name must be a non-empty string of letters, digits, '_' or '-', got {name!r}")
    if name in _RESERVED_TASK_NAMES:
        raise ValueError(f"task name '{name}' is reserved (it would shadow a torch module attribute): rename the task")
    task_type = task.get("type", "classification")
    if task_type not in TASK_TYPES:
        raise ValueError(f"task '{name}': type '{task_type}' is not one of {list(TASK_TYPES)}")
    allowed = _COMMON_KEYS | _TYPE_KEYS.get(task_type, set())
    unknown = set(task) - allowed
    if unknown:
        raise ValueError(
            f"task '{name}': unknown keys {sorted(unknown)} for a {task_type} task; allowed: {sorted(allowed)}"
        )
    loss_weight = task.get("loss_weight", 1.0)
    if not _number(loss_weight) or loss_weight < 0:
        raise ValueError(f"task '{name}': loss_weight must be a finite number >= 0, got {loss_weight!r}")

    normalized = {
        "name": name,
        "type": task_type,
        "labels": _normalize_labels(name, task_type, task.get("labels")),
        "loss_weight": float(loss_weight),
    }
    if task_type in HEADLESS_TASK_TYPES:
        if task.get("head") is not None:
            raise ValueError(f"task '{name}': a {task_type} task has no head (it scores the embeddings directly)")
    else:
        normalized["head"] = _normalize_head(name, task.get("head"), default_dropout)
        head = normalized["head"]
        if task_type == "pair_classification" and (
            head.get("pooling") or head.get("layers") or head["type"] == "transformer"
        ):
            raise ValueError(
                f"task '{name}': a pair_classification head reads the two sentence embeddings (its pair_features), "
                "not token states: it takes no pooling, no layers of its own and no 'transformer' type"
            )
        reads_tokens = task_type == "token_classification" or head.get("pooling") == "attention"
        if (head["type"] == "transformer" or head.get("layers")) and not reads_tokens:
            raise ValueError(
                f"task '{name}': a transformer head, or one with layers of its own, reads token states: use it for "
                "token tasks, or with pooling 'attention' for single-text sentence-level tasks"
            )
    normalized.update(_type_options(name, task_type, task))
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
            head on the shared vector (`pooling: shared`) then use the projected vector. Heads with their own
            pooling or layers read the encoder's token states (`hidden_size`).
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
        prompts (`dict[str, str]`, *optional*):
            Named texts that `encode(..., prompt_name=...)` puts before each sentence (sentence-transformers'
            prompts, e.g. `{"query": "query: "}`), read from a sentence-transformers checkpoint by `from_backbone`.
        default_prompt_name (`str`, *optional*):
            The prompt `encode` uses when none is named.
        pipeline_task (`str`, *optional*):
            The task that `pipeline("text-classification")` / `pipeline("token-classification")` serve (default: the
            first task of a type the pipeline can serve).
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
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        pipeline_task: str | None = None,
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

        if prompts is not None and (
            not isinstance(prompts, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
        ):
            raise ValueError(f"prompts must map prompt names to strings, got {prompts!r}")
        if default_prompt_name is not None and default_prompt_name not in (prompts or {}):
            raise ValueError(
                f"default_prompt_name '{default_prompt_name}' is not one of the prompts {sorted(prompts or {})}"
            )
        normalized_tasks = [normalize_task(task, head_dropout) for task in (tasks or [])]
        depth = backbone_depth(backbone_config)
        for task in normalized_tasks:
            layers = (task.get("head") or {}).get("layers", 0)
            if depth and layers > depth:
                raise ValueError(f"task '{task['name']}': head layers={layers} exceeds the backbone's {depth} layers")
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
        self.prompts = dict(prompts) if prompts else None
        self.default_prompt_name = default_prompt_name
        self.pipeline_task = pipeline_task
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

    def is_pair_task(self, name: str) -> bool:
        """Whether the task scores two texts (`PAIR_TASK_TYPES`) rather than one."""
        return self.get_task(name)["type"] in PAIR_TASK_TYPES

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


__all__ = [
    "MultiTaskConfig",
    "normalize_task",
    "POOLING_MODES",
    "TASK_TYPES",
    "TEXT_TASK_TYPES",
    "PAIR_TASK_TYPES",
    "EMBEDDING_TASK_TYPES",
    "HEAD_TYPES",
]
