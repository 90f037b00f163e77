"""Task types: one class per type, holding everything that differs between them.

A task type decides which options a task takes, what a training row holds and how its labels are read, the head it
gets, what the head reads of the encoder pass, the loss, how predictions are worded, which metrics score it, where
its outputs live in an ONNX export, whether the service and the command line give it texts or pairs, and how the
model card describes it. Everything else in the project asks the task object (`MultiTaskConfig.task(name)`) and
never compares type names.

Adding a type is one class here and one `@register_task_type` line (docs/DESIGN.md shows the diff that added
`cross_encoder`). The classes are stateless apart from the task's normalised config entry (`spec`), so a task object
is cheap to make whenever one is needed.

This file travels with every checkpoint (relative imports from the other model files), so it stays self-contained:
standard library, numpy, torch and transformers. Functions that training needs (label conversion, metrics) take
what they need from their caller (a tokenizer, a metric loader) and import nothing of the training package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F
from transformers.activations import ACT2FN

try:  # inside a Hub/remote-code package
    from .layers_mtl import (
        IGNORE_INDEX,
        TaskHead,
        classification_loss,
        contrastive_loss,
        cosent_loss,
        elementwise_loss,
        gather_with_grad,
        gathered_offset,
        labelled_mask,
        pair_features,
        scale_gradient,
        text_fingerprints,
    )
    from .validation_mtl import DataError, InputError, InputTypeError, is_int, is_number
except ImportError:  # installed as top-level modules, or run from the project folder
    from layers_mtl import (
        IGNORE_INDEX,
        TaskHead,
        classification_loss,
        contrastive_loss,
        cosent_loss,
        elementwise_loss,
        gather_with_grad,
        gathered_offset,
        labelled_mask,
        pair_features,
        scale_gradient,
        text_fingerprints,
    )
    from validation_mtl import DataError, InputError, InputTypeError, is_int, is_number

# What a head with a read-out of its own can be: linear / mlp read a vector; transformer first runs a fresh
# transformer layer over the token states (an adapter of the task's own).
HEAD_TYPES = ("linear", "mlp", "transformer")
_HEAD_KEYS = {"type", "hidden_size", "activation", "dropout", "pooling", "layers"}
# What a sentence-level head reads: the shared sentence vector (the embedding, before normalisation), or its own
# learned attention pooling of the token states, which leaves the embedding to the shared pooling.
HEAD_POOLINGS = ("shared", "attention")
SIMILARITY_LOSSES = ("cosent", "cosine_mse")
PAIR_FEATURES = ("u", "v", "|u-v|", "u*v")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------- the base class


class Task:
    """One task of a model: its normalised entry of `MultiTaskConfig.tasks` (`spec`) and the rules of its type.

    Class attributes say what the type is; methods do what differs between types, grouped by who asks: the config
    (`normalize`), the model (`build_head`, `logits`, `loss`), the data pipeline (`tokenize_rows`, `convert_label`,
    `missing_label`, `collate_labels`), the trainer and metrics (`eval_predictions`, `eval_references`, `metrics`),
    inference (`scores`, `describe`, `predict_pairs`), and the card and service (`describe_head`, `predict_hint`).
    """

    type: ClassVar[str] = ""
    # What it reads and how a caller gives it.
    takes_pairs: ClassVar[bool] = False  # `predict`, the service and the CLI give it (text, text_pair) pairs
    reads_words: ClassVar[bool] = False  # one prediction per word, from token states
    trains_embedding: ClassVar[bool] = False  # its loss trains the sentence embedding itself
    has_head: ClassVar[bool] = True  # a head of its own; without one, it scores the embeddings directly
    has_labels: ClassVar[bool] = True  # label names in the config
    min_labels: ClassVar[int] = 2
    default_labels: ClassVar[list[str] | None] = None
    options: ClassVar[tuple[str, ...]] = ()  # config keys of this type beyond name/type/labels/head/loss_weight
    # Training rows: the columns a row's texts come from by default, how they become token ids, and the label.
    default_columns: ClassVar[tuple[str, str | None]] = ("text", None)
    row_encoding: ClassVar[str] = "separate"  # each text of a row on its own ("joint": a pair as one sequence)
    uses_token_types: ClassVar[bool] = False  # its texts carry token type ids (segments A and B of a joint pair)
    hard_negatives: ClassVar[bool] = False  # a row may add a hard negative text (`negative_column`)
    has_label_column: ClassVar[bool] = True  # its label comes from a column (contrastive rows are their own)
    label_dtype: ClassVar[str] = "int64"  # "int64" (ids, -100 missing) or "float32" (values, NaN missing)
    label_per: ClassVar[str] = "row"  # "row": one value; "label": one per label name; "token": one per token
    label_cell_is_list: ClassVar[bool] = False  # a data row's label cell holds a list of label names
    # Scoring, serving and describing.
    primary_metric: ClassVar[str] = "macro_f1"  # enters the combined score
    hub_task: ClassVar[str] = "text-classification"  # the Hub's task type of its model-index results
    card_tag: ClassVar[str] = "text-classification"
    pipeline: ClassVar[str | None] = None  # the transformers pipeline that can serve it alone
    problem_type: ClassVar[str] = "single_label_classification"  # for that pipeline's head class
    onnx_graph: ClassVar[str | None] = "text"  # the exported graph holding its logits: "text", "pair" or None
    predict_hint: ClassVar[str] = "..."

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def labels(self) -> list[str]:
        return self.spec.get("labels") or []

    @property
    def loss_weight(self) -> float:
        return self.spec["loss_weight"]

    @property
    def head_spec(self) -> dict[str, Any] | None:
        return self.spec.get("head")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------------ config

    @classmethod
    def normalize(cls, name: str, task: dict[str, Any], default_dropout: float) -> dict[str, Any]:
        """The type's part of a normalised task dict: `labels`, `head` (for types with one) and its options, each
        checked and with its default."""
        normalized: dict[str, Any] = {"labels": cls.normalize_labels(name, task.get("labels"))}
        if cls.has_head:
            head = normalize_head(name, task.get("head"), default_dropout)
            cls.check_head(name, head)
            normalized["head"] = head
        elif task.get("head") is not None:
            raise InputError(f"task '{name}': a {cls.type} task has no head (it scores the embeddings directly)")
        normalized.update(cls.normalize_options(name, task))
        return normalized

    @classmethod
    def normalize_labels(cls, name: str, labels: Any) -> list[str]:
        if not cls.has_labels:
            if labels not in (None, [], ["score"]):
                raise InputError(f"task '{name}': a {cls.type} task has no label names (it scores embeddings)")
            return []
        if labels is None and cls.default_labels is not None:
            labels = list(cls.default_labels)
        if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
            raise InputError(f"task '{name}': `labels` must be a list of label names (strings), got {labels!r}")
        labels = list(labels)
        if len(labels) < cls.min_labels:
            raise InputError(f"task '{name}': a {cls.type} task needs at least {cls.min_labels} labels, got {labels}")
        blank = [label for label in labels if not label.strip() or label != label.strip()]
        if blank:
            raise InputError(
                f"task '{name}': label names must be non-empty and without surrounding spaces, got {blank}"
            )
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise InputError(f"task '{name}': duplicate labels {duplicates}")
        return labels

    @classmethod
    def check_head(cls, name: str, head: dict[str, Any]) -> None:
        """Refuse head settings that make no sense for the type (the head dict is normalised already)."""
        if (head["type"] == "transformer" or head.get("layers")) and head.get("pooling") != "attention":
            raise InputError(
                f"task '{name}': a transformer head, or one with layers of its own, reads token states: use it for "
                "token tasks, or with pooling 'attention' for single-text sentence-level tasks"
            )

    @classmethod
    def normalize_options(cls, name: str, task: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def default_head(cls, settings: Any) -> dict[str, Any] | None:
        """The head a task gets when its spec sets none, from a training run's head settings (`head_type`,
        `head_pooling`, `head_layers`, `token_head_type`, `token_head_layers`); `None` for a plain linear head on
        the shared vector (and for types without a head)."""
        if not cls.has_head:
            return None
        head: dict[str, Any] = {"type": settings.head_type} if settings.head_type != "linear" else {}
        if settings.head_pooling != "shared":
            head["pooling"] = settings.head_pooling
        if settings.head_layers and head.get("pooling") == "attention":
            head["layers"] = settings.head_layers
        return head or None

    # ------------------------------------------------------------------ the model

    def head_input_size(self, config: Any) -> int:
        """What the read-out reads: a token state when the head has its own view of the tokens, else the embedding."""
        return config.hidden_size if self.head_spec.get("pooling") == "attention" else config.embedding_dim

    def num_outputs(self) -> int:
        return len(self.labels)

    def build_head(self, config: Any, backbone: torch.nn.Module) -> TaskHead | None:
        if not self.has_head:
            return None
        backbone_config = config.backbone_config
        attention_heads = getattr(backbone_config, "num_attention_heads", None) or getattr(
            backbone_config, "n_heads", 1
        )
        return TaskHead(self.head_input_size(config), self.num_outputs(), self.head_spec, attention_heads, backbone)

    def logits(self, head: TaskHead | None, batch: Any, gradient_scale: float = 1.0) -> torch.Tensor | None:
        """The task's output for one encoder pass (`modeling_mtl.EncodedBatch`), or `None` when the batch holds
        nothing this task reads (a pair task's batch of single texts). `gradient_scale`: the share of the gradient
        that a head of a single-text task passes back into the shared encoder."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`(sum over labelled items, number of labelled items)`, the labels checked first (dtype, shape, range)."""
        raise NotImplementedError

    def empty_batch_loss(self, model: Any, batch: Any) -> torch.Tensor:
        """The loss of a batch that holds none of this task's rows: an exact zero that still depends on its weights
        (distributed training then sees every parameter take part)."""
        return model.zero_loss(self.name, batch.features)

    # ------------------------------------------------------------------ training rows

    @classmethod
    def tokenize_rows(
        cls, tokenizer: Any, columns: list[list[Any]], max_length: int, words: bool = False
    ) -> tuple[Any, list[list[list[int]]], list[list[list[int]]] | None]:
        """Tokenise a batch of rows given as one list per input column; returns the encoding of the first column
        (word ids for token labels), each row's texts as token id lists, and their token type ids (or `None`)."""
        encodings = [
            tokenizer(
                values,
                is_split_into_words=words and position == 0,
                truncation=True,
                max_length=max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            for position, values in enumerate(columns)
        ]
        rows = len(columns[0])
        texts = [[encoding["input_ids"][row] for encoding in encodings] for row in range(rows)]
        return encodings[0], texts, None

    def missing_label(self, num_tokens: int) -> Any:
        """The processed label of a row that has none for this task."""
        if self.label_per == "token":
            return [IGNORE_INDEX] * num_tokens
        missing = IGNORE_INDEX if self.label_dtype == "int64" else math.nan
        return [missing] * len(self.labels) if self.label_per == "label" else missing

    def convert_label(self, value: Any, where: str, mapper: LabelMapper | None, row: Any = None) -> Any:
        """A raw label of the data file as the processed row holds it (see `missing_label` for a missing one)."""
        raise NotImplementedError

    def collate_labels(self, values: list[Any], length: int) -> torch.Tensor:
        """One batch's processed labels as a tensor (token labels padded to the batch's `length`)."""
        if self.label_per == "token":
            tensor = torch.full((len(values), length), IGNORE_INDEX, dtype=torch.long)
            for row, value in enumerate(values):
                tensor[row, : len(value)] = torch.tensor(value[:length], dtype=torch.long)
            return tensor
        dtype = torch.long if self.label_dtype == "int64" else torch.float32
        return torch.tensor(values, dtype=dtype)

    # ------------------------------------------------------------------ evaluation

    def eval_predictions(self, outputs: Any, rows: int) -> torch.Tensor:
        """What the metrics need of this task for one batch, with the same shape in every batch (the Trainer
        concatenates them): its logits, as float32."""
        logits = outputs.logits.get(self.name)
        if logits is None:  # a pair task in a batch of single texts: filler, its references are all missing
            width = () if self.label_per == "row" and self.label_dtype == "float32" else (len(self.labels),)
            filler = float("nan") if not width else 0.0
            return outputs.embeddings.new_full((rows, *width), filler, dtype=torch.float32)
        return logits.detach().float()

    def eval_references(self, labels: torch.Tensor | None, inputs: dict[str, Any]) -> torch.Tensor | None:
        return labels

    def metrics(self, predictions: np.ndarray, references: np.ndarray, load_metric: Callable) -> dict[str, float]:
        """Metrics over the labelled items; `load_metric(name, config=None)` gives an `evaluate` metric."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inference

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """Probabilities (or values) per row as a numpy array: one softmax and one device-to-host copy per batch."""
        return logits.float().softmax(-1).cpu().numpy()

    def describe(self, scores: np.ndarray) -> dict[str, Any]:
        """One input's prediction from its row of `scores`: the best label, its probability, every probability."""
        values = scores.tolist()
        best = int(scores.argmax())
        return {"label": self.labels[best], "score": values[best], "scores": dict(zip(self.labels, values))}

    def predict_pairs(self, pairs: Any) -> list[dict[str, Any]]:
        """Predictions for text pairs (`inference_mtl.PairInputs`), for the types that take pairs."""
        raise NotImplementedError

    def format_prediction(self, prediction: dict[str, Any]) -> str:
        """A short form of one prediction, for the end-of-run report."""
        return f"{self.name}={prediction['label']} ({prediction['score']:.2f})"

    # ------------------------------------------------------------------ the model card

    def describe_type(self) -> str:
        return self.type

    def describe_head(self) -> str:
        head = self.head_spec
        if head is None:
            return "none"
        text = head.get("type", "linear")
        if text == "mlp":
            text += f" (hidden {head.get('hidden_size') or 'same as input'}, {head.get('activation', 'gelu')})"
        if head.get("layers"):
            text += f", own copies of the top {head['layers']} layer(s)"
        if head.get("pooling") == "attention":
            text += ", own attention pooling"
        return text + f", dropout {head.get('dropout', 0.1)}"


# ---------------------------------------------------------------------------------------------- the registry

REGISTRY: dict[str, type[Task]] = {}
DEFAULT_TASK_TYPE = "classification"  # a task that names no type


def register_task_type(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task type named `cls.type`."""
    if not cls.type or not re.fullmatch(r"[a-z][a-z0-9_]*", cls.type):
        raise ValueError(f"a task type needs a lowercase `type` name, got {cls.type!r}")
    REGISTRY[cls.type] = cls
    return cls


def task_class(type_name: Any, task_name: str | None = None) -> type[Task]:
    """The class of a task type, or an `InputError` naming the task and the known types."""
    if type_name not in REGISTRY:
        where = f"task '{task_name}': " if task_name else ""
        raise InputError(f"{where}type {type_name!r} is not one of {list(REGISTRY)}")
    return REGISTRY[type_name]


def make_task(spec: dict[str, Any]) -> Task:
    """The task object of a normalised task dict."""
    return task_class(spec["type"], spec.get("name"))(spec)


def normalize_head(task_name: str, head: Any, default_dropout: float) -> dict[str, Any]:
    """A task's `head` entry (a dict, a head type name or `None`) with every default filled in."""
    if head is None:
        head = {}
    elif isinstance(head, str):
        head = {"type": head}
    elif not isinstance(head, dict):
        raise InputError(f"task '{task_name}': `head` must be a dict, a head type string or None, got {head!r}")
    unknown = set(head) - _HEAD_KEYS
    if unknown:
        raise InputError(f"task '{task_name}': unknown head keys {sorted(unknown)}; allowed: {sorted(_HEAD_KEYS)}")
    head_type = head.get("type", "linear")
    if head_type not in HEAD_TYPES:
        raise InputError(f"task '{task_name}': head type '{head_type}' is not one of {list(HEAD_TYPES)}")
    dropout = head.get("dropout", default_dropout)
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise InputError(f"task '{task_name}': head dropout must be a number in [0, 1), got {dropout!r}")
    normalized: dict[str, Any] = {"type": head_type, "dropout": float(dropout)}
    layers = head.get("layers", 0)
    if not is_int(layers) or layers < 0:
        raise InputError(f"task '{task_name}': head layers must be an int >= 0, got {layers!r}")
    if layers:
        normalized["layers"] = int(layers)
    pooling = head.get("pooling", "shared")
    if pooling not in HEAD_POOLINGS:
        raise InputError(f"task '{task_name}': head pooling '{pooling}' is not one of {list(HEAD_POOLINGS)}")
    if pooling != "shared":
        normalized["pooling"] = pooling
    if head_type in ("mlp", "transformer"):
        hidden_size = head.get("hidden_size")
        if hidden_size is not None and (not is_int(hidden_size) or hidden_size <= 0):
            raise InputError(f"task '{task_name}': head hidden_size must be a positive int, got {hidden_size!r}")
        activation = head.get("activation", "gelu")
        if activation not in ACT2FN:
            raise InputError(
                f"task '{task_name}': head activation '{activation}' is unknown; allowed: {sorted(ACT2FN)}"
            )
        normalized.update(hidden_size=None if hidden_size is None else int(hidden_size), activation=activation)
    elif "hidden_size" in head or "activation" in head:
        raise InputError(f"task '{task_name}': hidden_size/activation only apply to 'mlp' / 'transformer' heads")
    return normalized


# ---------------------------------------------------------------------------------------------- labels of the data


def is_missing(value: Any) -> bool:
    """A label cell that holds no label: `None`, a blank string or NaN."""
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    )


def label_key(task: str, value: Any, where: str) -> str:
    """The canonical name of a class label, or a `DataError` for a value that cannot be one.

    Normalisations (documented in docs/RELIABILITY.md): integer-valued floats are integers (`1.0` -> `"1"`: a CSV
    integer column with a blank cell is read as floats), integers and their strings are the same label (`1` and
    `"1"`), and surrounding whitespace is stripped (`"pos "` -> `"pos"`).
    """
    if isinstance(value, bool):
        raise DataError(f"task '{task}': boolean label {value} in {where}: use 0/1 or label names")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        raise DataError(f"task '{task}': fractional class label {value} in {where}: class labels are names or integers")
    if isinstance(value, str):
        return value.strip()
    raise DataError(
        f"task '{task}': label {value!r:.60} in {where} is a {type(value).__name__}, not a label name or id"
    )


def finite_number(task: str, value: Any, where: str) -> float:
    """A score or value of the data as a float32-representable number, or a `DataError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise DataError(f"task '{task}': {where} holds {value!r:.60}, not a number") from None
        else:
            raise DataError(f"task '{task}': {where} holds {value!r:.60}, not a number")
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise DataError(f"task '{task}': {where} holds {value}, not a finite float32 number")
    return float(value)


def integers_are_ids(spec_labels: list[str] | None, class_label: bool) -> bool:
    """Whether an integer in the data indexes the label list (`0` is `labels[0]`) or names a label (`1` is `"1"`).

    A `ClassLabel` column's integers are ids. So are the data's when the spec lists its labels as names (GLUE-style
    0/1 rows for `["negative", "positive"]`), but not when those names are numbers themselves: with `["1", "2", "3"]`
    a `1` in the data is the label `"1"`, not `labels[1]` (the two readings disagree, and `1` and `"1"` are the same
    label everywhere else). With no labels given, they are collected from the data by name.
    """
    if class_label:
        return True
    if spec_labels is None:
        return False
    return not any(label.strip().lstrip("-").isdigit() for label in spec_labels if isinstance(label, str))


class LabelMapper:
    """Maps raw label values (names or ints) to ids, and names the label, row and split when one is unknown.

    Args:
        task: the task name; labels: its label names.
        ints_are_ids: integers index into `labels` (labels given in the spec, or a `ClassLabel` column); otherwise
            an integer is the name of a label (`1` is `"1"`).
    """

    def __init__(self, task: str, labels: list[str], ints_are_ids: bool):
        self.task = task
        self.labels = labels
        self.label2id = {label: index for index, label in enumerate(labels)}
        self.ints_are_ids = ints_are_ids

    def __call__(self, value: Any, where: str) -> int:
        if self.ints_are_ids and isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise DataError(f"task '{self.task}': fractional class id {value} in {where}")
            if 0 <= value < len(self.labels):
                return int(value)
            raise DataError(
                f"task '{self.task}': label id {value} in {where} is out of range "
                f"0..{len(self.labels) - 1} ({self.labels})"
            )
        key = label_key(self.task, value, where)
        if key not in self.label2id:
            raise DataError(
                f"task '{self.task}': label '{key}' in {where} was never seen in the training data "
                f"(known labels: {self.labels})"
            )
        return self.label2id[key]


# ---------------------------------------------------------------------------------------------- label checks


def _integer_labels(name: str, labels: torch.Tensor, expected: Sequence[int]) -> torch.Tensor:
    """Class ids of the expected shape, as int64 (what cross-entropy takes: int32 or uint8 ids are converted)."""
    if labels.is_floating_point():
        raise InputError(f"task '{name}': labels must be integer ids ({IGNORE_INDEX} for missing), got floats")
    _check_shape(name, labels, expected)
    return labels.long()


def _float_labels(
    name: str, labels: torch.Tensor, expected: Sequence[int], score_range: Sequence[float] | None = None
) -> torch.Tensor:
    """Targets of the expected shape as float32, each given one (NaN: missing) a finite float32 number, and within
    `score_range` where the task declares one (gold scores). The one rule for every float target, of the data
    (`finite_number`) and of `forward`: a value float32 cannot hold (1e39) would become inf, and the loss with it."""
    values = labels.to(torch.float32)
    _check_shape(name, values, expected)
    given = labelled_mask(values)
    wrong = given & ~torch.isfinite(values)
    if score_range is not None:
        low, high = score_range
        wrong |= given & ((values < low) | (values > high))
    if wrong.any():
        bad = labels[wrong][0].item()  # as given: 1e39 rather than the inf it became
        if score_range is not None:
            raise InputError(
                f"task '{name}': gold scores must be finite and within its score_range [{low:g}, {high:g}] "
                f"(NaN for missing), got {bad}"
            )
        raise InputError(f"task '{name}': targets must be finite float32 numbers (NaN for missing), got {bad}")
    return values


def _check_shape(name: str, labels: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(labels.shape) != tuple(expected):
        raise InputError(f"task '{name}': labels have shape {tuple(labels.shape)}, expected {tuple(expected)}")


def _check_label_range(name: str, labels: torch.Tensor, label_names: list[str]) -> None:
    labels = labels[labelled_mask(labels)]
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= len(label_names):
        bad = low if low < 0 else high
        raise InputError(
            f"task '{name}': label id {bad} is out of range; valid ids are 0..{len(label_names) - 1} "
            f"({label_names}) or {IGNORE_INDEX} for unlabelled"
        )


def as_label_tensor(name: str, labels: Any) -> torch.Tensor:
    """Labels as a tensor: lists and numpy arrays are converted; booleans and other types are an error."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise InputTypeError(
                f"task '{name}': labels must be a tensor, a numpy array or a list of numbers"
            ) from None
    if labels.dtype == torch.bool or labels.is_complex():
        raise InputTypeError(f"task '{name}': labels must be numbers (class ids or scores), got {labels.dtype}")
    return labels


def _labelled(references: np.ndarray) -> np.ndarray:
    return labelled_mask(torch.from_numpy(np.array(references))).numpy()


# ---------------------------------------------------------------------------------------------- single-text tasks


class _SentenceTask(Task):
    """A task on one text per row whose head reads a sentence: the shared vector (the embedding before
    normalisation, projected if configured), or its own attention pooling of the token states, optionally over its
    own copies of the encoder's top layers."""

    pipeline = "text-classification"

    def logits(self, head: TaskHead, batch: Any, gradient_scale: float = 1.0) -> torch.Tensor:
        if head.pooling is None:
            features = scale_gradient(batch.features, gradient_scale)
            return head(features[:, 0])  # (batch, num_labels)
        states = batch.head_token_states(head, gradient_scale)  # (batch, seq, hidden)
        mask = batch.first_mask
        return head(head.pooling(head.adapt(states, mask), mask))  # (batch, num_labels)


@register_task_type
class ClassificationTask(_SentenceTask):
    """One label per text: softmax over the labels, cross-entropy, accuracy and macro-F1."""

    type = "classification"
    predict_hint = '{"label": ..., "score": ..., "scores": {label: probability}}'

    def loss(self, logits, labels, batch):
        labels = _integer_labels(self.name, labels, logits.shape[:-1])
        _check_label_range(self.name, labels, self.labels)
        return classification_loss(logits, labels)

    def convert_label(self, value, where, mapper, row=None):
        return IGNORE_INDEX if is_missing(value) else mapper(value, where)

    def metrics(self, predictions, references, load_metric):
        keep = _labelled(references)
        if not keep.any():
            return {}
        predicted = np.asarray(predictions)[keep].argmax(-1).tolist()
        gold = references[keep].astype(int).tolist()
        return {
            "accuracy": load_metric("mtl_accuracy").compute(predictions=predicted, references=gold)["accuracy"],
            "macro_f1": load_metric("mtl_f1").compute(
                predictions=predicted, references=gold, average="macro", labels=list(range(len(self.labels)))
            )["f1"],
        }


@register_task_type
class MultiLabelClassificationTask(_SentenceTask):
    """Any number of labels per text: a sigmoid per label, binary cross-entropy, labels above `threshold`."""

    type = "multi_label_classification"
    options = ("threshold",)
    min_labels = 1
    label_dtype = "float32"
    label_per = "label"
    label_cell_is_list = True
    primary_metric = "micro_f1"
    card_tag = "multi-label-classification"
    problem_type = "multi_label_classification"
    predict_hint = '{"labels": [labels above the threshold], "scores": {label: probability}}'

    @classmethod
    def normalize_options(cls, name, task):
        threshold = task.get("threshold", 0.5)
        if not is_number(threshold) or not 0.0 < threshold < 1.0:
            raise InputError(f"task '{name}': threshold must be in (0, 1), got {threshold!r}")
        return {"threshold": float(threshold)}

    def loss(self, logits, labels, batch):
        labels = _float_labels(self.name, labels, logits.shape)
        valid = labelled_mask(labels)
        bad = labels[valid & (labels != 0) & (labels != 1)]
        if bad.numel():
            raise InputError(
                f"task '{self.name}': multi-label targets must be 0 or 1 (NaN for missing), got {bad[0].item()}"
            )
        return elementwise_loss(logits, labels, "bce")

    def convert_label(self, value, where, mapper, row=None):
        if value is None:
            return [math.nan] * len(self.labels)
        if not isinstance(value, list):
            raise DataError(f"task '{self.name}': {where} must hold a list of labels, got {value!r:.60}")
        hot = [0.0] * len(self.labels)
        for label in value:
            hot[mapper(label, where)] = 1.0
        return hot

    def metrics(self, predictions, references, load_metric):
        references = references.astype(np.float64)
        keep = _labelled(references).all(-1)
        if not keep.any():
            return {}
        probabilities = 1.0 / (1.0 + np.exp(-np.asarray(predictions, dtype=np.float64)[keep]))
        predicted = (probabilities >= self.spec.get("threshold", 0.5)).astype(int).tolist()
        gold = references[keep].astype(int).tolist()
        f1 = load_metric("mtl_f1", "multilabel")
        return {
            "micro_f1": f1.compute(predictions=predicted, references=gold, average="micro")["f1"],
            "macro_f1": f1.compute(predictions=predicted, references=gold, average="macro")["f1"],
        }

    def scores(self, logits):
        return logits.float().sigmoid().cpu().numpy()

    def describe(self, scores):
        values = scores.tolist()
        chosen = [label for label, p in zip(self.labels, values) if p >= self.spec["threshold"]]
        return {"labels": chosen, "scores": dict(zip(self.labels, values))}

    def format_prediction(self, prediction):
        return f"{self.name}={prediction['labels']}"

    def describe_type(self):
        return f"{self.type} (threshold {self.spec['threshold']})"


def correlation_metrics(
    predictions: np.ndarray, references: np.ndarray, names: list[str], load_metric: Callable
) -> dict[str, float]:
    """Pearson and Spearman per output (regression) or of the cosine against the gold score (similarity)."""
    predictions = np.asarray(predictions, dtype=np.float64).reshape(len(references), -1)
    references = np.asarray(references, dtype=np.float64).reshape(len(references), -1)
    results: dict[str, float] = {}
    for column, name in enumerate(names):
        keep = _labelled(references[:, column])
        if not keep.any():
            continue
        scores = load_metric("mtl_correlation").compute(
            predictions=predictions[keep, column].tolist(), references=references[keep, column].tolist()
        )
        suffix = "" if len(names) == 1 else f"_{name}"
        results.update({f"{key}{suffix}": value for key, value in scores.items()})
    if len(names) > 1 and results:
        results["spearman"] = float(np.nanmean([v for k, v in results.items() if k.startswith("spearman_")]))
    return results


@register_task_type
class RegressionTask(_SentenceTask):
    """One or more real values per text (`labels` names them, default `["score"]`): squared error, correlations."""

    type = "regression"
    min_labels = 1
    default_labels = ["score"]
    label_dtype = "float32"
    label_per = "label"
    primary_metric = "spearman"
    card_tag = "text-regression"
    problem_type = "regression"

    @property
    def predict_hint(self) -> str:  # type: ignore[override]
        return '{"value": ...}' if len(self.labels) <= 1 else '{"values": {name: value}}'

    def loss(self, logits, labels, batch):
        if labels.dim() == 1:
            labels = labels.unsqueeze(-1)
        labels = _float_labels(self.name, labels, logits.shape)
        return elementwise_loss(logits, labels, "mse")

    def convert_label(self, value, where, mapper, row=None):
        values = value if isinstance(value, list) else [value]
        if all(is_missing(v) for v in values):
            return [math.nan] * len(self.labels)
        if len(values) != len(self.labels):
            raise DataError(f"task '{self.name}': {where} has {len(values)} values, expected {len(self.labels)}")
        return [math.nan if is_missing(v) else finite_number(self.name, v, where) for v in values]

    def metrics(self, predictions, references, load_metric):
        return correlation_metrics(predictions, references, self.labels or ["score"], load_metric)

    def scores(self, logits):
        return logits.float().cpu().numpy()

    def describe(self, scores):
        values = scores.tolist()
        return {"value": values[0]} if len(values) == 1 else {"values": dict(zip(self.labels, values))}

    def format_prediction(self, prediction):
        if "value" in prediction:
            return f"{self.name}={prediction['value']:.3f}"
        return f"{self.name}=" + ", ".join(f"{k}: {v:.3f}" for k, v in prediction["values"].items())


@register_task_type
class TokenClassificationTask(Task):
    """A tag per word (NER, chunking): the head reads each token state (optionally through its own top layers or
    a transformer layer of its own); the first sub-token of a word carries the word's tag."""

    type = "token_classification"
    reads_words = True
    label_per = "token"
    label_cell_is_list = True
    primary_metric = "f1"
    hub_task = "token-classification"
    card_tag = "token-classification"
    pipeline = "token-classification"
    default_columns = ("tokens", None)
    predict_hint = '{"words": [{"word", "tag", "score", ...}], "entities": [{"entity", "text", ...}]}'

    @classmethod
    def check_head(cls, name, head):
        pass  # every head reads token states here

    @classmethod
    def default_head(cls, settings):
        kind = settings.token_head_type
        head: dict[str, Any] = {"type": kind} if kind != "linear" else {}
        if settings.token_head_layers:
            head["layers"] = settings.token_head_layers
        return head or None

    def head_input_size(self, config):
        return config.hidden_size

    def logits(self, head, batch, gradient_scale=1.0):
        states = batch.head_token_states(head, gradient_scale)  # (batch, seq, hidden)
        return head(head.adapt(states, batch.first_mask))  # (batch, seq, num_labels)

    def loss(self, logits, labels, batch):
        labels = _integer_labels(self.name, labels, logits.shape[:-1])
        _check_label_range(self.name, labels, self.labels)
        return classification_loss(logits, labels)

    def convert_label(self, value, where, mapper, row=None):
        """Tags aligned to sub-tokens: the first sub-token of each word carries the word's tag; the others are
        ignored, or with `row.label_all_subtokens` (training only) carry it too (`B-X` continuing as `I-X`).
        `row`: `.words` (the row's words) and `.word_ids` (the tokenizer's word index per token)."""
        word_ids = row.word_ids
        if value is None:
            return [IGNORE_INDEX] * len(word_ids)
        if not isinstance(value, list) or len(value) != len(row.words):
            count = len(value) if isinstance(value, list) else "no list of"
            raise DataError(f"task '{self.name}': {where} has {len(row.words)} words but {count} tags")
        ids = [IGNORE_INDEX if is_missing(tag) else mapper(tag, where) for tag in value]
        continuation = {
            index: mapper.label2id.get("I-" + label[2:], index)
            for index, label in enumerate(self.labels)
            if label.startswith("B-")
        }
        aligned, previous = [], None
        for word_id in word_ids:
            if word_id is None:
                aligned.append(IGNORE_INDEX)
            elif word_id != previous:
                aligned.append(ids[word_id])
            elif row.label_all_subtokens and ids[word_id] != IGNORE_INDEX:
                aligned.append(continuation.get(ids[word_id], ids[word_id]))
            else:
                aligned.append(IGNORE_INDEX)
            previous = word_id
        return aligned

    def eval_predictions(self, outputs, rows):
        return outputs.logits[self.name].argmax(-1)  # only the predicted tag: saves memory over the logits

    def metrics(self, predictions, references, load_metric):
        predictions = np.asarray(predictions)
        width = min(predictions.shape[1], references.shape[1])
        predicted_tags, gold_tags = [], []
        for row_predictions, row_references in zip(predictions[:, :width], references[:, :width]):
            keep = _labelled(row_references)  # one position per word: metrics are per word, not per sub-token
            if not keep.any():
                continue
            predicted_tags.append([self.labels[int(i)] for i in row_predictions[keep]])
            gold_tags.append([self.labels[int(i)] for i in row_references[keep]])
        if not gold_tags:
            return {}
        return load_metric("mtl_seqeval").compute(predictions=predicted_tags, references=gold_tags)

    def describe_words(
        self,
        probabilities: np.ndarray,
        word_ids: list[int | None],
        offsets: list[tuple[int, int]] | None,
        item: str | Sequence[str],
    ) -> dict[str, Any]:
        """Tags per word (read from each word's first sub-token, as in training) and grouped entity spans.

        Args:
            probabilities: `(tokens, num_labels)` for this sentence's tokens.
            word_ids: the tokenizer's word index of every token (`None` for special tokens).
            offsets: character offsets of every token, or `None` when the input was a list of words.
            item: the input string, or its list of words.
        """
        best_tags = probabilities.argmax(-1)
        first_token: dict[int, int] = {}
        last_token: dict[int, int] = {}
        for position, word_id in enumerate(word_ids):
            if word_id is not None:
                first_token.setdefault(word_id, position)
                last_token[word_id] = position

        def entry(word: str, start: int, end: int, word_id: int) -> dict[str, Any]:
            position = first_token.get(word_id)
            if position is None:
                return {"word": word, "start": start, "end": end, "tag": None, "score": None}
            best = int(best_tags[position])
            tag, score = self.labels[best], float(probabilities[position, best])
            return {"word": word, "start": start, "end": end, "tag": tag, "score": score}

        words = []
        if offsets is None:
            # Pre-split words: one entry per input word, offsets into the words joined by single spaces. A word
            # without any token (an empty string) or beyond the truncation length has no tag.
            text, cursor = " ".join(item), 0
            for word_id, word in enumerate(item):
                start, end = cursor, cursor + len(word)
                cursor = end + 1
                words.append(entry(word, start, end, word_id))
        else:
            # A string's words are the tokenizer's (split at whitespace and punctuation, as the training words
            # were), each from its first sub-token's start. It ends where the next word or a whitespace begins,
            # not where its last sub-token does: the offsets leave out characters the tokenizer's normaliser
            # dropped, such as a decomposed accent's combining mark ("e\u0301") that ends a word.
            text = item
            ordered = sorted(first_token)
            starts = [offsets[first_token[word_id]][0] for word_id in ordered]
            for number, word_id in enumerate(ordered):
                start, end = starts[number], offsets[last_token[word_id]][1]
                limit = starts[number + 1] if number + 1 < len(ordered) else len(text)
                while end < limit and not text[end].isspace():
                    end += 1
                words.append(entry(text[start:end], start, end, word_id))
        return {"words": words, "entities": group_entities([w for w in words if w["tag"]], text)}

    def format_prediction(self, prediction):
        entities = ", ".join(f"{e['text']}:{e['entity']}" for e in prediction["entities"]) or "-"
        return f"{self.name}=[{entities}]"


def group_entities(words: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Group per-word BIO/IOB2 tags (`B-PER`, `I-PER`, `O`; plain `PER` counts as inside) into entity spans."""
    entities: list[dict[str, Any]] = []
    current = None
    for word in words:
        tag = word["tag"]
        if tag == "O" or not tag:
            current = None
            continue
        prefix, _, entity_type = tag.partition("-") if tag[:2] in ("B-", "I-", "E-", "S-") else ("I", "", tag)
        if current is not None and prefix in ("I", "E") and current["entity"] == entity_type:
            current["end"] = word["end"]
            current["scores"].append(word["score"])
        else:
            current = {"entity": entity_type, "start": word["start"], "end": word["end"], "scores": [word["score"]]}
            entities.append(current)
        if prefix in ("E", "S"):
            current = None
    return [
        {
            "entity": e["entity"],
            "text": text[e["start"] : e["end"]],
            "start": e["start"],
            "end": e["end"],
            "score": float(np.mean(e["scores"])),
        }
        for e in entities
    ]


# ---------------------------------------------------------------------------------------------- pair tasks


class _BiEncoderPairTask(Task):
    """A task on two (or three) texts per row, each embedded by the shared encoder in the same pass: these train
    the embedding itself. `predict` embeds both sides with the fast `encode` path."""

    takes_pairs = True
    trains_embedding = True
    has_head = False
    has_labels = False
    default_columns = ("sentence1", "sentence2")
    hub_task = "sentence-similarity"
    onnx_graph = None  # scored on the `features` output

    def predict_pairs(self, pairs):
        return [{"cosine": cosine} for cosine in pairs.cosines().tolist()]

    def format_prediction(self, prediction):
        return f"{self.name}=cos {prediction['cosine']:.3f}"

    def describe_head(self):
        return f"none: cosine of the two embeddings (scale {self.spec.get('scale', 20.0)})"


def _scale_option(name: str, task: dict[str, Any]) -> float:
    # 20 is sentence-transformers' default for both CoSENT and multiple-negatives ranking: cosines in [-1, 1]
    # become logits in [-20, 20], sharp enough for a softmax over in-batch candidates.
    scale = task.get("scale", 20.0)
    if not is_number(scale) or scale <= 0:
        raise InputError(f"task '{name}': scale must be a number > 0, got {scale!r}")
    return float(scale)


def _score_range_option(name: str, task: dict[str, Any]) -> list[float]:
    score_range = task.get("score_range", [0.0, 1.0])
    if (
        not isinstance(score_range, (list, tuple))
        or len(score_range) != 2
        or not all(is_number(v) for v in score_range)
        or not score_range[0] < score_range[1]
    ):
        raise InputError(f"task '{name}': score_range must be [low, high] with low < high, got {score_range!r}")
    return [float(score_range[0]), float(score_range[1])]


def _checked_score(task: Task, value: Any, where: str) -> float:
    """A gold score of the data within the task's `score_range` (NaN when missing)."""
    if is_missing(value):
        return math.nan
    score = finite_number(task.name, value, where)
    low, high = task.spec["score_range"]
    if not low <= score <= high:
        raise DataError(f"task '{task.name}': score {score} in {where} is outside score_range [{low}, {high}]")
    return score


def _score_targets(task: Task, labels: torch.Tensor, expected: Sequence[int]) -> torch.Tensor:
    """Gold scores checked (`_float_labels`, against the task's `score_range`) and mapped from it to [0, 1]."""
    low, high = task.spec["score_range"]
    return (_float_labels(task.name, labels, expected, (low, high)) - low) / (high - low)


@register_task_type
class SimilarityTask(_BiEncoderPairTask):
    """A gold similarity score per pair: the cosine of the two embeddings, CoSENT (or cosine-MSE), Spearman."""

    type = "similarity"
    options = ("loss", "score_range", "scale")
    label_dtype = "float32"
    primary_metric = "spearman"
    card_tag = "sentence-similarity"
    predict_hint = 'model.predict([(text_a, text_b)]) -> {"cosine": ...}'

    @classmethod
    def normalize_options(cls, name, task):
        loss = task.get("loss", "cosent")
        if loss not in SIMILARITY_LOSSES:
            raise InputError(f"task '{name}': loss '{loss}' is not one of {list(SIMILARITY_LOSSES)}")
        return {"scale": _scale_option(name, task), "loss": loss, "score_range": _score_range_option(name, task)}

    def logits(self, head, batch, gradient_scale=1.0):
        if batch.num_texts < 2:
            return None
        u, v = batch.features[:, 0], batch.features[:, 1]
        return F.cosine_similarity(u.float(), v.float(), dim=-1)  # (batch,)

    def loss(self, logits, labels, batch):
        targets = _score_targets(self, labels, logits.shape)
        if self.spec["loss"] == "cosent":
            return cosent_loss(logits, targets, self.spec["scale"])
        return elementwise_loss(logits, targets, "mse")

    def convert_label(self, value, where, mapper, row=None):
        return _checked_score(self, value, where)

    def metrics(self, predictions, references, load_metric):
        return correlation_metrics(predictions, references, ["score"], load_metric)

    def describe_head(self):
        return super().describe_head() + f", {self.spec.get('loss', 'cosent')} loss, scores {self.spec['score_range']}"


@register_task_type
class PairClassificationTask(_BiEncoderPairTask):
    """A label per pair (paraphrase, entailment): the SBERT classifier, a head on (u, v, |u-v|) of the two
    embeddings, cross-entropy."""

    type = "pair_classification"
    options = ("pair_features",)
    has_head = True
    has_labels = True
    card_tag = "text-pair-classification"
    hub_task = "text-classification"
    onnx_graph = "pair"
    predict_hint = 'model.predict([(text_a, text_b)]) -> {"label": ..., "score": ..., "scores": {...}}'

    @classmethod
    def normalize_options(cls, name, task):
        features = task.get("pair_features", ["u", "v", "|u-v|"])
        if (
            not isinstance(features, (list, tuple))
            or not features
            or any(feature not in PAIR_FEATURES for feature in features)
            or len(set(features)) != len(features)
        ):
            raise InputError(
                f"task '{name}': pair_features must be a non-empty list of distinct items of {list(PAIR_FEATURES)}, "
                f"got {features!r}"
            )
        return {"pair_features": list(features)}

    @classmethod
    def check_head(cls, name, head):
        if head.get("pooling") or head.get("layers") or head["type"] == "transformer":
            raise InputError(
                f"task '{name}': a pair_classification head reads the two sentence embeddings (its pair_features), "
                "not token states: it takes no pooling, no layers of its own and no 'transformer' type"
            )

    @classmethod
    def default_head(cls, settings):
        return {"type": settings.head_type} if settings.head_type != "linear" else None

    def head_input_size(self, config):
        return len(self.spec["pair_features"]) * config.embedding_dim

    def logits(self, head, batch, gradient_scale=1.0):
        if batch.num_texts < 2:
            return None
        return self.pair_logits(head, batch.features[:, 0], batch.features[:, 1])  # (batch, num_labels)

    def pair_logits(self, head: TaskHead, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The head on two batches of sentence features."""
        return head(pair_features(u, v, self.spec["pair_features"]))

    def loss(self, logits, labels, batch):
        labels = _integer_labels(self.name, labels, logits.shape[:-1])
        _check_label_range(self.name, labels, self.labels)
        return classification_loss(logits, labels)

    convert_label = ClassificationTask.convert_label
    metrics = ClassificationTask.metrics

    def predict_pairs(self, pairs):
        scores = self.scores(pairs.pair_head_logits(self.name))
        return [self.describe(row) for row in scores]

    format_prediction = Task.format_prediction

    def describe_head(self):
        head = self.head_spec
        text = head["type"]
        if text == "mlp":
            text += f" (hidden {head.get('hidden_size') or 'same as input'}, {head.get('activation', 'gelu')})"
        return text + f" on ({', '.join(self.spec['pair_features'])}), dropout {head['dropout']}"


@register_task_type
class ContrastiveTask(_BiEncoderPairTask):
    """Retrieval: each anchor's positive (and hard negative) among the batch's candidates, multiple-negatives
    ranking loss over in-batch negatives (gathered from every process when asked), recall@1 and MRR."""

    type = "contrastive"
    options = ("scale", "gather_across_processes")
    hard_negatives = True
    has_label_column = False
    default_columns = ("anchor", "positive")
    primary_metric = "mrr"
    card_tag = "retrieval"
    predict_hint = 'model.predict([(query, passage)]) -> {"cosine": ...}'

    @classmethod
    def normalize_options(cls, name, task):
        gather = task.get("gather_across_processes", False)
        if not isinstance(gather, bool):
            raise InputError(f"task '{name}': gather_across_processes must be true or false, got {gather!r}")
        return {"scale": _scale_option(name, task), "gather_across_processes": gather}

    def logits(self, head, batch, gradient_scale=1.0):
        if batch.num_texts < 2:
            return None
        features = batch.features
        u = features[:, 0]
        candidates = features[:, 1:].transpose(0, 1).reshape(-1, features.shape[-1])  # positives, then negatives
        return self.spec["scale"] * F.normalize(u.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T

    def gathers(self) -> bool:
        """Whether the candidates come from every process: when gradients are computed only. Gathering serves the
        gradient; an evaluation (under `no_grad`) may give one process a batch with the task's rows and another
        none, and there the loss is each process's own."""
        return self.spec["gather_across_processes"] and torch.is_grad_enabled()

    def loss(self, logits, labels, batch):
        labels = _integer_labels(self.name, labels, logits.shape[:1])
        valid = labelled_mask(labels)
        features, texts = batch.features, batch.texts
        rows = valid.nonzero().squeeze(-1)
        fingerprints = texts.fingerprints().view(texts.batch_size, -1)[rows]  # (n, texts)
        anchors = features[rows, 0]  # (n, dim)
        candidates = features[rows, 1:].transpose(0, 1).reshape(-1, features.shape[-1])  # (n * (texts-1), dim)
        # Per candidate: its text, and for a positive its row's anchor (a hard negative: its own text; see
        # `contrastive_loss`), so that another row's positive for the same anchor text is not a negative.
        positive_of = torch.cat([fingerprints[:, :1], fingerprints[:, 2:]], dim=1)  # (n, texts - 1)
        candidate_ids = torch.stack([fingerprints[:, 1:], positive_of], -1).transpose(0, 1).reshape(-1, 2)
        present = texts.present_mask_grouped()[rows, 1:].transpose(0, 1).reshape(-1)
        candidates, candidate_ids = candidates[present], candidate_ids[present]
        offset = 0
        if self.gathers():
            candidate_ids, _ = gather_with_grad(candidate_ids)
            candidates, _ = gather_with_grad(candidates)
            # This process's positives come first among its own candidates.
            offset = gathered_offset(present.sum())
        targets = offset + torch.arange(len(rows), device=features.device)
        total = contrastive_loss(
            anchors,
            candidates,
            targets,
            candidate_ids[:, 0],
            fingerprints[:, 0],
            self.spec["scale"],
            candidate_ids[:, 1],
        )
        return total, valid.sum()

    def empty_batch_loss(self, model, batch):
        zero = super().empty_batch_loss(model, batch)
        if not self.gathers():
            return zero
        # The other processes gather this task's candidates: take part, with none, in the same collective calls in
        # the same order, with an exact zero that depends on the gathered candidates so that the gather's backward
        # (a collective too) runs here as well.
        features = batch.features
        gather_with_grad(torch.zeros(0, 2, dtype=torch.long, device=features.device))  # the candidates' ids
        candidates, _ = gather_with_grad(features[:0, 0])  # (0, dim), in the graph
        gathered_offset(torch.zeros((), dtype=torch.long, device=features.device))
        return zero + candidates.float().sum() * 0.0

    def convert_label(self, value, where, mapper, row=None):
        return 0  # every row of a contrastive source takes part: its positive is the target

    def eval_predictions(self, outputs, rows):
        embeddings = outputs.embeddings  # the anchor and positive embeddings: retrieval is scored over the split
        if embeddings.dim() == 3 and embeddings.shape[1] >= 2:
            return embeddings[:, :2].detach().float()
        return embeddings.new_zeros((rows, 2, embeddings.shape[-1]), dtype=torch.float32)

    def eval_references(self, labels, inputs):
        """`(rows, 2)` ids of each row's anchor and positive text (`IGNORE_INDEX` for rows without the task):
        retrieval is scored per distinct query over distinct passages, each query's relevant passages the positives
        of every row with its text (`metrics`)."""
        if labels is None:
            return labels
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if input_ids.dim() < 3:  # a batch of single texts: no row of this task
            return labels.new_full((len(labels), 2), IGNORE_INDEX)
        ids = retrieval_text_ids(input_ids[:, :2], attention_mask[:, :2])  # (rows, 2)
        return torch.where(labelled_mask(labels)[:, None].to(ids.device), ids, IGNORE_INDEX)

    def metrics(self, predictions, references, load_metric):
        """Recall@1 and MRR over the split, as an information-retrieval evaluation: each distinct anchor text is a
        query, ranked against every distinct positive text of the split; its relevant passages are the positives of
        every row with that anchor. A passage holding the query's own text is left out, as the training loss leaves
        it out of the negatives.

        Args:
            predictions: `(n, 2, dim)` each row's anchor and positive embeddings.
            references: `(n, 2)` each row's anchor and positive text ids (`IGNORE_INDEX` for rows without the task).
        """
        predictions = np.asarray(predictions, dtype=np.float32)
        references = references.reshape(len(references), -1)
        keep = _labelled(references).all(-1)
        anchor_ids, positive_ids = references[keep, 0], references[keep, 1]
        queries, query_rows, query_of = np.unique(anchor_ids, return_index=True, return_inverse=True)
        passages, passage_rows, passage_of = np.unique(positive_ids, return_index=True, return_inverse=True)
        if len(passages) < 2:
            return {}
        embeddings = predictions[keep]
        embeddings = embeddings / np.clip(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12, None)
        scores = embeddings[query_rows, 0] @ embeddings[passage_rows, 1].T  # (queries, passages)
        relevant = np.zeros(scores.shape, dtype=bool)
        relevant[query_of, passage_of] = True
        scores[(queries[:, None] == passages[None, :]) & ~relevant] = -np.inf
        return load_metric("mtl_retrieval").compute(
            predictions=scores.tolist(), references=[np.flatnonzero(row).tolist() for row in relevant]
        )


# ---------------------------------------------------------------------------------------------- joint pairs


@register_task_type
class CrossEncoderTask(_SentenceTask):
    """A pair scored by one joint pass of the shared encoder over `[CLS] a [SEP] b [SEP]` (token type ids mark the
    second text where the encoder has them), with a sentence head on that pass, as sentence-transformers'
    `CrossEncoder` scores pairs: one checkpoint then serves bi-encoder embeddings, a reranker and the classifiers.

    One label (default `["score"]`): a relevance or similarity score, a sigmoid over one logit trained with binary
    cross-entropy against the gold score mapped from `score_range` to [0, 1] (`CrossEncoder(num_labels=1)` with
    `BinaryCrossEntropyLoss`); predictions `{"score": p}`, scored by Spearman / Pearson. Two labels or more: a
    label per pair, softmax and cross-entropy, as `classification`. It reads no sentence embedding of either text,
    so it does not train the embedding (the protection keeps it, as for the other heads).
    """

    type = "cross_encoder"
    options = ("score_range",)
    takes_pairs = True
    row_encoding = "joint"
    uses_token_types = True
    min_labels = 1
    default_labels = ["score"]
    default_columns = ("sentence1", "sentence2")
    card_tag = "cross-encoder"

    @classmethod
    def normalize_options(cls, name, task):
        labels = task.get("labels")
        if labels is not None and isinstance(labels, (list, tuple)) and len(labels) > 1:
            if "score_range" in task:
                raise InputError(f"task '{name}': score_range only applies to a cross_encoder with one score label")
            return {}
        return {"score_range": _score_range_option(name, task)}

    @property
    def scores_pairs(self) -> bool:
        """One score per pair (one label) rather than a label among several."""
        return len(self.labels) == 1

    @property
    def label_dtype(self) -> str:  # type: ignore[override]
        return "float32" if self.scores_pairs else "int64"

    @property
    def primary_metric(self) -> str:  # type: ignore[override]
        return "spearman" if self.scores_pairs else "macro_f1"

    @property
    def problem_type(self) -> str | None:  # type: ignore[override]
        return None if self.scores_pairs else "single_label_classification"  # None: the pipeline's sigmoid

    @property
    def predict_hint(self) -> str:  # type: ignore[override]
        if self.scores_pairs:
            return 'model.predict([(query, passage)]) -> {"score": relevance in [0, 1]}'
        return 'model.predict([(text_a, text_b)]) -> {"label": ..., "score": ..., "scores": {...}}'

    @classmethod
    def tokenize_rows(cls, tokenizer, columns, max_length, words=False):
        """Each row's two texts as one sequence, with their token type ids, as `CrossEncoder` tokenizes pairs."""
        first, second = columns[:2]
        encoding = tokenizer(
            first,
            second,
            truncation="longest_first",
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=True,
        )
        types = encoding.get("token_type_ids") or [[0] * len(ids) for ids in encoding["input_ids"]]
        return encoding, [[ids] for ids in encoding["input_ids"]], [[row] for row in types]

    def loss(self, logits, labels, batch):
        if not self.scores_pairs:
            return ClassificationTask.loss(self, logits, labels, batch)
        return elementwise_loss(logits[:, 0], _score_targets(self, labels, logits.shape[:1]), "bce")

    def convert_label(self, value, where, mapper, row=None):
        if self.scores_pairs:
            return _checked_score(self, value, where)
        return ClassificationTask.convert_label(self, value, where, mapper, row)

    def metrics(self, predictions, references, load_metric):
        if not self.scores_pairs:
            return ClassificationTask.metrics(self, predictions, references, load_metric)
        scores = 1.0 / (1.0 + np.exp(-np.asarray(predictions, dtype=np.float64).reshape(-1)))
        return correlation_metrics(scores, references, ["score"], load_metric)

    def scores(self, logits):
        if self.scores_pairs:
            return logits.float().sigmoid().cpu().numpy()
        return super().scores(logits)

    def describe(self, scores):
        if self.scores_pairs:
            return {"score": float(scores[0])}
        return super().describe(scores)

    def predict_pairs(self, pairs):
        return [self.describe(row) for row in self.scores(pairs.joint_logits(self.name))]

    def format_prediction(self, prediction):
        if self.scores_pairs:
            return f"{self.name}={prediction['score']:.3f}"
        return super().format_prediction(prediction)

    def describe_head(self):
        return super().describe_head() + ", on the two texts encoded together"


def retrieval_text_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The text ids a contrastive task's references hold: equal for equal token sequences, and non-negative, so
    that no id can read as `IGNORE_INDEX`."""
    return text_fingerprints(input_ids, attention_mask) & (2**62 - 1)


__all__ = [
    "HEAD_POOLINGS",
    "HEAD_TYPES",
    "PAIR_FEATURES",
    "SIMILARITY_LOSSES",
    "DEFAULT_TASK_TYPE",
    "REGISTRY",
    "ClassificationTask",
    "ContrastiveTask",
    "CrossEncoderTask",
    "LabelMapper",
    "MultiLabelClassificationTask",
    "PairClassificationTask",
    "RegressionTask",
    "SimilarityTask",
    "Task",
    "TokenClassificationTask",
    "as_label_tensor",
    "finite_number",
    "group_entities",
    "is_missing",
    "label_key",
    "make_task",
    "normalize_head",
    "register_task_type",
    "retrieval_text_ids",
    "task_class",
]
