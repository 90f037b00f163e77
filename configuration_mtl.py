"""Configuration of the multi-task sentence transformer.

This file is copied next to the weights by `save_pretrained`, so it stays self-contained: it imports `transformers`,
the standard library and the other model files it travels with (`tasks_mtl` for what each task type takes,
`validation_mtl` for the shared checks), never the rest of this project.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

try:  # inside a Hub/remote-code package
    from .layers_mtl import backbone_depth
    from .tasks_mtl import DEFAULT_TASK_TYPE, HEAD_TYPES, REGISTRY, Task, make_task, task_class
    from .validation_mtl import (
        InputError,
        check_flag,
        check_int,
        check_max_seq_length,
        is_number,
        resolve_max_seq_length,
    )
except ImportError:  # installed as top-level modules, or run from the project folder
    from layers_mtl import backbone_depth
    from tasks_mtl import DEFAULT_TASK_TYPE, HEAD_TYPES, REGISTRY, Task, make_task, task_class
    from validation_mtl import (
        InputError,
        check_flag,
        check_int,
        check_max_seq_length,
        is_number,
        resolve_max_seq_length,
    )

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "weighted_mean", "last_token", "attention")
# The built-in task types by what they read; `MultiTaskConfig.task(name)` answers for any registered type.
TASK_TYPES = tuple(REGISTRY)
PAIR_TASK_TYPES = tuple(name for name, cls in REGISTRY.items() if cls.takes_pairs)
TEXT_TASK_TYPES = tuple(name for name in TASK_TYPES if name not in PAIR_TASK_TYPES)
EMBEDDING_TASK_TYPES = tuple(name for name, cls in REGISTRY.items() if cls.trains_embedding)
# Keys every task may have; each type adds its own (`Task.options`).
_COMMON_KEYS = {"name", "type", "labels", "head", "loss_weight"}
_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# Heads live in an `nn.ModuleDict` keyed by task name, which refuses a key that is one of its attributes (`cpu`,
# `keys`, `half`, `_modules`, ...): every such name is reserved, asked of torch, not listed by hand. "embedding"
# names the embedding's own metrics (`eval_embedding/...`), "type" a task's type key.
_RESERVED_TASK_NAMES = frozenset(dir(nn.ModuleDict())) | {"embedding", "type"}
# The largest `projection_dim`: embedding models use a few thousand dimensions at most, and a larger value is a typo
# that would ask for a `hidden_size x projection_dim` weight matrix (10**10 columns: terabytes) before any error.
MAX_PROJECTION_DIM = 65536


def normalize_task(task: dict[str, Any], default_dropout: float = 0.1) -> dict[str, Any]:
    """Validate one task description and return it with every default filled in.

    Args:
        task (`dict`):
            Every task: `name` (str), `type` (a registered task type, default `"classification"`), `loss_weight`
            (float >= 0, default 1).
            Tasks with a head (all but `similarity` and `contrastive`): `labels` (label names; for `regression` the
            names of the predicted values, default `["score"]`) and `head` (`"linear"`, `"mlp"` or a dict with
            `type`, `hidden_size`, `activation`, `dropout`, and for sentence-level tasks `pooling`: `"shared"`, the
            default, reads the sentence embedding's pooled vector; `"attention"` gives the head its own learned
            attention pooling of the token states, and `layers: k` its own copies of the encoder's top k layers).
            Type `"transformer"` (token tasks, or with `pooling: attention`) runs a fresh transformer layer of the
            task's own over the token states first.
            `multi_label_classification`: `threshold` (probability above which a label is predicted, default 0.5).
            `similarity`: `loss` (`"cosent"`, default, or `"cosine_mse"`), `score_range` (`[low, high]` of the
            gold scores, default `[0, 1]`), `scale` (CoSENT's, default 20).
            `pair_classification`: `pair_features` (what the head reads of the two embeddings u, v: any of
            `"u"`, `"v"`, `"|u-v|"`, `"u*v"`; default `["u", "v", "|u-v|"]`, the SBERT classifier).
            `contrastive`: `scale` (cosine -> logit factor, default 20), `gather_across_processes` (in-batch
            negatives from every process under DDP, default false).
            The type's own keys are its class's `options` (`tasks_mtl`).
        default_dropout (`float`): head dropout used when the task does not set one.
    """
    if not isinstance(task, dict):
        raise InputError(f"each task must be a dict, got {type(task).__name__}: {task!r}")
    name = task.get("name")
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise InputError(f"task name must be a non-empty string of letters, digits, '_' or '-', got {name!r}")
    if name in _RESERVED_TASK_NAMES:
        raise InputError(f"task name '{name}' is reserved (it would shadow a torch module attribute): rename the task")
    cls = task_class(task.get("type", DEFAULT_TASK_TYPE), name)
    allowed = _COMMON_KEYS | set(cls.options)
    unknown = set(task) - allowed
    if unknown:
        raise InputError(
            f"task '{name}': unknown keys {sorted(unknown)} for a {cls.type} task; allowed: {sorted(allowed)}"
        )
    loss_weight = task.get("loss_weight", 1.0)
    if not is_number(loss_weight) or loss_weight < 0:
        raise InputError(f"task '{name}': loss_weight must be a finite number >= 0, got {loss_weight!r}")
    normalized = {"name": name, "type": cls.type, "loss_weight": float(loss_weight)}
    normalized.update(cls.normalize(name, task, default_dropout))
    return normalized


def normalize_tasks(tasks: Any, default_dropout: float = 0.1, argument: str = "tasks") -> list[dict[str, Any]]:
    """A list of task descriptions, each checked and filled in (`normalize_task`), their names unique; anything but a
    list or tuple of them is an error naming `argument`."""
    if not isinstance(tasks, (list, tuple)):
        raise InputError(f"{argument} must be a list of task dicts, got {type(tasks).__name__}: {tasks!r:.80}")
    normalized = [normalize_task(task, default_dropout) for task in tasks]
    names = [task["name"] for task in normalized]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"duplicate task names {duplicates}: every task needs its own name")
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
            If set (1 to `MAX_PROJECTION_DIM`, 65536), a linear layer maps the pooled vector to this size; the
            embedding and every sequence-level head on the shared vector (`pooling: shared`) then use the projected
            vector. Heads with their own pooling or layers read the encoder's token states (`hidden_size`).
        projection_activation (`str`, *optional*):
            Activation after the projection (e.g. `"tanh"`); `None` keeps it linear.
        normalize (`bool`, *optional*, defaults to `False`):
            L2-normalise the sentence embedding returned by `forward`/`encode` (heads always read the
            un-normalised vector, so normalisation never limits what a classifier can learn).
        max_seq_length (`int`, *optional*):
            Texts longer than this many tokens (special tokens included) are truncated. Default: what
            `validation_mtl.resolve_max_seq_length` gives for the backbone (512, or fewer when its positions are).
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
        max_seq_length: int | None = None,
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
                raise InputError("backbone_config: a dict backbone config needs a 'model_type' key (e.g. 'bert')")
            backbone_config = AutoConfig.for_model(**backbone_config)
        if not isinstance(backbone_config, PretrainedConfig):
            raise InputError(f"backbone_config must be a PretrainedConfig or dict, got {type(backbone_config)}")
        if backbone_config.model_type == self.model_type:
            raise InputError(
                "backbone_config describes a multi-task model itself: the backbone is the encoder inside it "
                "(use its backbone_config, or MultiTaskModel.from_pretrained for the whole model)"
            )
        if pooling not in POOLING_MODES:
            raise InputError(f"pooling '{pooling}' is not one of {list(POOLING_MODES)}")
        if projection_dim is not None:
            check_int("projection_dim", projection_dim, minimum=1, maximum=MAX_PROJECTION_DIM)
        if projection_activation is not None and projection_activation not in ACT2FN:
            raise InputError(f"projection_activation '{projection_activation}' is unknown; allowed: {sorted(ACT2FN)}")
        if max_seq_length is None:
            max_seq_length = resolve_max_seq_length(backbone_config)
        check_max_seq_length(max_seq_length, backbone_config)
        if not is_number(head_dropout) or not 0.0 <= head_dropout < 1.0:
            raise InputError(f"head_dropout must be a number in [0, 1), got {head_dropout!r}")
        normalize = check_flag("normalize", normalize, allow_none=False)

        if prompts is not None and (
            not isinstance(prompts, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
        ):
            raise InputError(f"prompts must map prompt names to strings, got {prompts!r}")
        if default_prompt_name is not None and default_prompt_name not in (prompts or {}):
            raise InputError(
                f"default_prompt_name '{default_prompt_name}' is not one of the prompts {sorted(prompts or {})}"
            )
        normalized_tasks = normalize_tasks([] if tasks is None else tasks, head_dropout)
        depth = backbone_depth(backbone_config)
        for task in normalized_tasks:
            layers = (task.get("head") or {}).get("layers", 0)
            if depth and layers > depth:
                raise InputError(f"task '{task['name']}': head layers={layers} exceeds the backbone's {depth} layers")

        self.backbone_config = backbone_config
        self.pooling = pooling
        self.projection_dim = projection_dim
        self.projection_activation = projection_activation
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.tasks = normalized_tasks
        self.head_dropout = float(head_dropout)
        self.prompts = dict(prompts) if prompts else None
        self.default_prompt_name = default_prompt_name
        self.pipeline_task = pipeline_task
        # `PretrainedConfig.__init__` hands its own attention implementation (None unless asked for) down to the
        # backbone's config: a backbone config that carries one (a loaded encoder's) keeps it.
        backbone_attention = backbone_config._attn_implementation_internal
        super().__init__(**kwargs)
        if "attn_implementation" not in kwargs and backbone_config._attn_implementation_internal is None:
            backbone_config._attn_implementation_internal = backbone_attention

    # Views over `tasks`; the list of task dicts itself stays the single source of truth.
    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks]

    def get_task(self, name: str) -> dict[str, Any]:
        """The normalised config entry of one task."""
        for task in self.tasks:
            if task["name"] == name:
                return task
        raise KeyError(f"unknown task '{name}'; this model's tasks are {self.task_names}")

    def task(self, name: str) -> Task:
        """The task object of one task (`tasks_mtl`): what its type decides, bound to its config entry."""
        return make_task(self.get_task(name))

    def task_objects(self) -> list[Task]:
        """Every task's object, in config order."""
        return [make_task(task) for task in self.tasks]

    def is_pair_task(self, name: str) -> bool:
        """Whether the task takes text pairs rather than single texts."""
        return self.task(name).takes_pairs

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
    "MAX_PROJECTION_DIM",
    "MultiTaskConfig",
    "normalize_task",
    "normalize_tasks",
    "task_class",
    "POOLING_MODES",
    "TASK_TYPES",
    "TEXT_TASK_TYPES",
    "PAIR_TASK_TYPES",
    "EMBEDDING_TASK_TYPES",
    "HEAD_TYPES",
]
