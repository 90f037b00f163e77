"""Multi-task data: load each task's dataset through `datasets`, resolve label sets, tokenise once with
`datasets.map`, align word labels to sub-tokens, and collate batches with dynamic padding.

Tasks that read the same dataset (same name/files, config and splits) share one *source*: each row is tokenised
once and carries a label column for every task of that source, so a dataset labelled for several tasks trains all
of them from one encoder pass. Every processed row has a `labels_<task>` column for *every* task (missing ones
empty / -100), so all sources concatenate into one `datasets.Dataset`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, Features, Sequence, Value, concatenate_datasets, load_dataset

IGNORE_INDEX = -100
LABEL_PREFIX = "labels_"
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SPEC_KEYS = {
    "name",
    "type",
    "labels",
    "head",
    "loss_weight",
    "threshold",  # model-side keys (see configuration_mtl)
    "dataset",
    "dataset_config",
    "data_files",
    "text_column",
    "label_column",
    "tokens_column",
    "tags_column",
    "train_split",
    "eval_split",
    "test_split",
    "max_train_samples",
    "max_eval_samples",
    "max_test_samples",
}


def label_column_name(task: str) -> str:
    """Name of the processed dataset column holding `task`'s labels."""
    return f"{LABEL_PREFIX}{task}"


@dataclass
class TaskDataSpec:
    """Where one task's data comes from and which columns hold its inputs and labels.

    Args:
        name: task name (letters, digits, `_`, `-`).
        type: `classification`, `multi_label_classification`, `token_classification` or `regression`.
        labels: label names; inferred from the training split (sorted) when omitted. With integer label columns
            and `labels` given, the integers index into `labels`.
        dataset: a Hub dataset id, a local data file (CSV/TSV/JSON/JSONL/Parquet), or a local folder holding
            `<split>.<ext>` files.
        dataset_config: Hub configuration name.
        data_files: `{split: path}`, for local files named otherwise.
        text_column / label_column: sentence input and label columns (sequence-level tasks).
        tokens_column / tags_column: word list and per-word tag columns (token tasks).
        train_split / eval_split / test_split: split names; slicing such as `"train[:90%]"` works.
        max_train_samples / max_eval_samples / max_test_samples: keep a seeded random subset of this size.
        head / loss_weight / threshold: passed to the model config (see `configuration_mtl.normalize_task`).
    """

    name: str
    type: str = "classification"
    labels: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    data_files: dict[str, str] | None = None
    text_column: str = "text"
    label_column: str | None = None
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    train_split: str = "train"
    eval_split: str | None = "validation"
    test_split: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_test_samples: int | None = None
    head: Any = None
    loss_weight: float = 1.0
    threshold: float | None = None

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TaskDataSpec:
        if not isinstance(spec, dict):
            raise ValueError(f"each task must be a dict, got {type(spec).__name__}: {spec!r}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError(
                f"task {spec.get('name')!r}: unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}"
            )
        if "name" not in spec:
            raise ValueError(f"task {spec!r} has no 'name'")
        result = cls(**spec)
        if result.label_column is None:
            result.label_column = result.name
        if result.dataset is None and not result.data_files:
            raise ValueError(f"task '{result.name}': give `dataset` (Hub id, file or folder) or `data_files`")
        return result

    def model_task(self) -> dict[str, Any]:
        """The task entry for `MultiTaskConfig(tasks=[...])` (labels must be resolved first)."""
        task = {"name": self.name, "type": self.type, "labels": self.labels, "loss_weight": self.loss_weight}
        if self.head is not None:
            task["head"] = self.head
        if self.threshold is not None:
            task["threshold"] = self.threshold
        return task

    def source_key(self) -> str:
        """Tasks with the same key read the same rows."""
        return json.dumps(
            [
                self.dataset,
                self.dataset_config,
                self.data_files,
                self.train_split,
                self.eval_split,
                self.test_split,
                self.max_train_samples,
                self.max_eval_samples,
                self.max_test_samples,
            ],
            sort_keys=True,
        )

    def describe_dataset(self) -> str:
        return self.dataset if self.dataset is not None else json.dumps(self.data_files, sort_keys=True)


def parse_task_specs(tasks: str | list | dict | None) -> list[TaskDataSpec]:
    """Task specs from a list of dicts, a JSON string, or a path to a JSON/YAML file holding the list."""
    if tasks is None:
        raise ValueError("no tasks given: pass --tasks (JSON list or a JSON/YAML file) or a config file with `tasks`")
    if isinstance(tasks, str):
        text = tasks
        if os.path.isfile(tasks):
            text = Path(tasks).read_text(encoding="utf-8")
            if tasks.endswith((".yaml", ".yml")):
                import yaml

                tasks = yaml.safe_load(text)
            else:
                tasks = json.loads(text)
        else:
            try:
                tasks = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"--tasks is neither a file nor valid JSON: {error}") from None
    if isinstance(tasks, dict):  # {name: spec} mapping
        tasks = [{"name": name, **spec} for name, spec in tasks.items()]
    specs = [TaskDataSpec.from_dict(spec) for spec in tasks]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate task names {duplicates}")
    if not specs:
        raise ValueError("the task list is empty")
    return specs


# ---------------------------------------------------------------------------------------------- loading


def _split_base(split: str) -> str:
    return re.sub(r"\[.*\]$", "", split)


def load_split(spec: TaskDataSpec, split: str, cache_dir: str | None = None) -> Dataset:
    """Load one split of a task's dataset (Hub id, local file, local folder, or explicit `data_files`)."""
    base = _split_base(split)
    files = dict(spec.data_files or {})
    builder, config = None, spec.dataset_config
    if spec.dataset is not None and os.path.isdir(spec.dataset) and not files:
        for candidate in sorted(Path(spec.dataset).iterdir()):
            if candidate.suffix in _FILE_BUILDERS and candidate.stem not in files:
                files[candidate.stem] = str(candidate)
        if not files:
            raise ValueError(f"task '{spec.name}': no CSV/JSON/JSONL/Parquet files in folder {spec.dataset}")
    elif spec.dataset is not None and os.path.isfile(spec.dataset) and not files:
        files = {"train": spec.dataset}
    if files:
        if base not in files:
            raise ValueError(f"task '{spec.name}': split '{base}' not found; available files: {sorted(files)}")
        if not os.path.isfile(files[base]):
            raise ValueError(f"task '{spec.name}': data file for split '{base}' not found: {files[base]}")
        suffix = Path(files[base]).suffix
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"task '{spec.name}': unsupported data file type '{suffix}' ({files[base]})")
        builder = _FILE_BUILDERS[suffix]
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        return load_dataset(builder, data_files={base: files[base]}, split=split, cache_dir=cache_dir, **kwargs)
    return load_dataset(spec.dataset, config, split=split, cache_dir=cache_dir)


def _subsample(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


# ---------------------------------------------------------------------------------------------- labels


def _is_missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _feature_names(feature: Any) -> list[str] | None:
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    if isinstance(feature, list) and feature and isinstance(feature[0], ClassLabel):
        return list(feature[0].names)
    return None


def _label_values(spec: TaskDataSpec, dataset: Dataset) -> list[Any]:
    column = spec.tags_column if spec.type == "token_classification" else spec.label_column
    values = []
    for value in dataset[column]:
        if spec.type in ("token_classification", "multi_label_classification"):
            values.extend(v for v in (value or []) if not _is_missing(v))
        elif not _is_missing(value):
            values.append(value)
    return values


def resolve_labels(spec: TaskDataSpec, train: Dataset) -> list[str]:
    """The task's label names: from the spec, the dataset's `ClassLabel` feature, or the training split (sorted)."""
    if spec.labels is not None:
        return [str(label) for label in spec.labels]
    if spec.type == "regression":
        return ["score"]
    column = spec.tags_column if spec.type == "token_classification" else spec.label_column
    if column not in train.column_names:
        raise ValueError(f"task '{spec.name}': column '{column}' not in the training split ({train.column_names})")
    names = _feature_names(train.features[column])
    if names is not None:
        return names
    values = _label_values(spec, train)
    if not values:
        raise ValueError(f"task '{spec.name}': no labels found in column '{column}' of the training split")
    if all(isinstance(v, (int, bool)) for v in values):
        return [str(v) for v in sorted(set(int(v) for v in values))]
    return sorted({str(v) for v in values})


class _LabelMapper:
    """Maps raw label values (names or ints) to ids, and names the label, row and split when one is unknown."""

    def __init__(self, spec: TaskDataSpec, names_from_feature: bool):
        self.spec = spec
        self.label2id = {label: index for index, label in enumerate(spec.labels)}
        self.int_is_index = names_from_feature

    def __call__(self, value: Any, split: str, row: int) -> int:
        if isinstance(value, (int,)) and not isinstance(value, bool) and self.int_is_index:
            if 0 <= value < len(self.spec.labels):
                return value
            raise ValueError(
                f"task '{self.spec.name}': label id {value} in {split} row {row} is out of range "
                f"0..{len(self.spec.labels) - 1} ({self.spec.labels})"
            )
        key = str(value)
        if key not in self.label2id:
            raise ValueError(
                f"task '{self.spec.name}': label '{key}' in {split} row {row} was never seen in the training data "
                f"(known labels: {self.spec.labels})"
            )
        return self.label2id[key]


# ---------------------------------------------------------------------------------------------- processing


def _label_features(tasks: list[TaskDataSpec]) -> dict[str, Any]:
    features = {}
    for spec in tasks:
        if spec.type == "classification":
            features[label_column_name(spec.name)] = Value("int64")
        elif spec.type == "token_classification":
            features[label_column_name(spec.name)] = Sequence(Value("int64"))
        else:
            features[label_column_name(spec.name)] = Sequence(Value("float32"))
    return features


def _tokenize_source(
    dataset: Dataset,
    source_tasks: list[TaskDataSpec],
    all_tasks: list[TaskDataSpec],
    tokenizer: Any,
    max_seq_length: int,
    split: str,
    label_all_subtokens: bool,
    feature_names: dict[str, bool],
) -> Dataset:
    token_tasks = [spec for spec in source_tasks if spec.type == "token_classification"]
    sentence_tasks = [spec for spec in source_tasks if spec.type != "token_classification"]
    use_words = bool(token_tasks)
    if use_words:
        words_columns = {spec.tokens_column for spec in token_tasks}
        if len(words_columns) > 1:
            raise ValueError(
                f"tasks {[s.name for s in token_tasks]} share a dataset but read different word "
                f"columns {sorted(words_columns)}"
            )
        input_column = words_columns.pop()
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("token-classification tasks need a fast tokenizer (for word ids)")
    else:
        text_columns = {spec.text_column for spec in sentence_tasks}
        if len(text_columns) > 1:
            raise ValueError(
                f"tasks {[s.name for s in sentence_tasks]} share a dataset but read different text "
                f"columns {sorted(text_columns)}"
            )
        input_column = text_columns.pop()
    needed = [input_column] + [
        s.tags_column if s.type == "token_classification" else s.label_column for s in source_tasks
    ]
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"tasks {[s.name for s in source_tasks]}: column(s) {missing} not in the {split} split "
            f"(columns: {dataset.column_names})"
        )
    mappers = {
        spec.name: _LabelMapper(spec, feature_names[spec.name])
        for spec in source_tasks
        if spec.type in ("classification", "token_classification", "multi_label_classification")
    }
    source_names = {spec.name for spec in source_tasks}
    is_train = split == "train"

    def process(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        inputs = batch[input_column]
        for position, value in enumerate(inputs):
            if (
                value is None
                or (use_words and not isinstance(value, list))
                or (not use_words and not isinstance(value, str))
            ):
                raise ValueError(
                    f"{split} row {indices[position]}: column '{input_column}' must hold "
                    f"{'a list of words' if use_words else 'a string'}, got {value!r:.80}"
                )
        encoding = tokenizer(inputs, is_split_into_words=use_words, truncation=True, max_length=max_seq_length)
        output = dict(encoding)
        rows = len(inputs)
        for spec in all_tasks:
            column = label_column_name(spec.name)
            if spec.name not in source_names:
                output[column] = [IGNORE_INDEX] * rows if spec.type == "classification" else [[] for _ in range(rows)]
                continue
            if spec.type == "classification":
                mapper = mappers[spec.name]
                output[column] = [
                    IGNORE_INDEX if _is_missing(v) else mapper(v, split, indices[i])
                    for i, v in enumerate(batch[spec.label_column])
                ]
            elif spec.type == "multi_label_classification":
                mapper, values = mappers[spec.name], []
                for i, chosen in enumerate(batch[spec.label_column]):
                    if chosen is None:
                        values.append([])
                        continue
                    hot = [0.0] * len(spec.labels)
                    for label in chosen:
                        hot[mapper(label, split, indices[i])] = 1.0
                    values.append(hot)
                output[column] = values
            elif spec.type == "regression":
                values = []
                for i, value in enumerate(batch[spec.label_column]):
                    value = value if isinstance(value, list) else [value]
                    if all(_is_missing(v) for v in value):
                        values.append([])
                    elif len(value) != len(spec.labels):
                        raise ValueError(
                            f"task '{spec.name}': {split} row {indices[i]} has {len(value)} values, "
                            f"expected {len(spec.labels)} ({spec.labels})"
                        )
                    else:
                        values.append([math.nan if _is_missing(v) else float(v) for v in value])
                output[column] = values
            else:  # token classification: label the first sub-token of each word (or all, when asked)
                mapper, values = mappers[spec.name], []
                continuation = {
                    index: mapper.label2id.get("I-" + label[2:], index)
                    for index, label in enumerate(spec.labels)
                    if label.startswith("B-")
                }
                for i, tags in enumerate(batch[spec.tags_column]):
                    word_ids = encoding.word_ids(i)
                    if tags is None:
                        values.append([IGNORE_INDEX] * len(word_ids))
                        continue
                    words = batch[input_column][i]
                    if len(tags) != len(words):
                        raise ValueError(
                            f"task '{spec.name}': {split} row {indices[i]} has {len(words)} words but {len(tags)} tags"
                        )
                    ids = [IGNORE_INDEX if _is_missing(tag) else mapper(tag, split, indices[i]) for tag in tags]
                    aligned, previous = [], None
                    for word_id in word_ids:
                        if word_id is None:
                            aligned.append(IGNORE_INDEX)
                        elif word_id != previous:
                            aligned.append(ids[word_id])
                        elif label_all_subtokens and is_train and ids[word_id] != IGNORE_INDEX:
                            aligned.append(continuation.get(ids[word_id], ids[word_id]))
                        else:
                            aligned.append(IGNORE_INDEX)
                        previous = word_id
                    values.append(aligned)
                output[column] = values
        return output

    processed = dataset.map(
        process,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc=f"Tokenizing {split} ({', '.join(sorted(source_names))})",
    )
    return processed.cast(Features({**processed.features, **_label_features(all_tasks)}))


@dataclass
class MultiTaskData:
    """Processed datasets for multi-task training.

    Attributes:
        specs: the task specs, labels resolved.
        train: all sources' training rows, concatenated in source order.
        source_sizes: rows per source in `train` (the task sampler draws batches per source).
        source_tasks: the task names of each source.
        eval / test: concatenated eval / test rows (or `None`).
        num_train_examples: per task, the number of labelled training rows.
    """

    specs: list[TaskDataSpec]
    train: Dataset
    source_sizes: list[int]
    source_tasks: list[list[str]]
    eval: Dataset | None = None
    test: Dataset | None = None
    num_train_examples: dict[str, int] = field(default_factory=dict)
    examples: list[Any] = field(default_factory=list)

    @property
    def model_tasks(self) -> list[dict[str, Any]]:
        return [spec.model_task() for spec in self.specs]


def build_datasets(
    specs: list[TaskDataSpec],
    tokenizer: Any,
    max_seq_length: int,
    label_all_subtokens: bool = False,
    seed: int = 42,
    cache_dir: str | None = None,
    do_eval: bool = True,
) -> MultiTaskData:
    """Load, label and tokenise every task's splits.

    Args:
        specs: task specs (see [`TaskDataSpec`]); labels are resolved in place.
        tokenizer: the model's (fast) tokenizer.
        max_seq_length: truncation length in tokens.
        label_all_subtokens: label every sub-token of a word in training (`B-` becomes `I-` after the first);
            evaluation always scores the first sub-token, so metrics stay per word.
        seed: seed of the `max_*_samples` subsets.
        do_eval: load eval splits (and check their labels).
    """
    sources: dict[str, list[TaskDataSpec]] = {}
    for spec in specs:
        sources.setdefault(spec.source_key(), []).append(spec)

    train_parts, eval_parts, test_parts, sizes, source_tasks = [], [], [], [], []
    num_train_examples: dict[str, int] = {}
    examples: list[Any] = []
    train_examples: list[Any] = []
    for group in sources.values():
        first = group[0]
        train = _subsample(load_split(first, first.train_split, cache_dir), first.max_train_samples, seed)
        feature_names = {}
        for spec in group:
            label_feature = train.features.get(
                spec.tags_column if spec.type == "token_classification" else spec.label_column
            )
            # Integer labels index into the label list when that list was given or came from a ClassLabel.
            feature_names[spec.name] = spec.labels is not None or _feature_names(label_feature) is not None
            spec.labels = resolve_labels(spec, train)
        train_examples.extend(_raw_inputs(train, group, 2))
        processed = _tokenize_source(
            train, group, specs, tokenizer, max_seq_length, "train", label_all_subtokens, feature_names
        )
        for spec in group:
            column = processed[label_column_name(spec.name)]
            if spec.type == "classification":
                num_train_examples[spec.name] = sum(1 for v in column if v != IGNORE_INDEX)
            elif spec.type == "token_classification":
                num_train_examples[spec.name] = sum(1 for v in column if any(x != IGNORE_INDEX for x in v))
            else:
                num_train_examples[spec.name] = sum(1 for v in column if v)
        train_parts.append(processed)
        sizes.append(len(processed))
        source_tasks.append([spec.name for spec in group])
        if do_eval and first.eval_split:
            evaluation = _subsample(load_split(first, first.eval_split, cache_dir), first.max_eval_samples, seed)
            examples.extend(_raw_inputs(evaluation, group, 2))
            eval_parts.append(
                _tokenize_source(
                    evaluation,
                    group,
                    specs,
                    tokenizer,
                    max_seq_length,
                    f"eval split '{first.eval_split}'",
                    False,
                    feature_names,
                )
            )
        if first.test_split:
            test = _subsample(load_split(first, first.test_split, cache_dir), first.max_test_samples, seed)
            test_parts.append(
                _tokenize_source(
                    test,
                    group,
                    specs,
                    tokenizer,
                    max_seq_length,
                    f"test split '{first.test_split}'",
                    False,
                    feature_names,
                )
            )
    return MultiTaskData(
        specs=specs,
        train=concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0],
        source_sizes=sizes,
        source_tasks=source_tasks,
        eval=(concatenate_datasets(eval_parts) if len(eval_parts) > 1 else eval_parts[0]) if eval_parts else None,
        test=(concatenate_datasets(test_parts) if len(test_parts) > 1 else test_parts[0]) if test_parts else None,
        num_train_examples=num_train_examples,
        examples=examples or train_examples,
    )


def _raw_inputs(dataset: Dataset, group: list[TaskDataSpec], count: int) -> list[Any]:
    """A few raw inputs (texts, or word lists for token tasks) to show example predictions on."""
    token_specs = [spec for spec in group if spec.type == "token_classification"]
    column = token_specs[0].tokens_column if token_specs else group[0].text_column
    if column not in dataset.column_names:
        return []
    return [value for value in dataset[column][:count] if value]


# ---------------------------------------------------------------------------------------------- collator


@dataclass
class MultiTaskCollator:
    """Pads a batch to its longest row (dynamic padding) and builds `labels={task: tensor}`.

    Every task gets a label tensor in every batch, all-missing when no row is labelled for it, so every head
    takes part in every loss (a zero that depends on its weights): distributed training then never sees a
    parameter without a gradient.

    Args:
        tokenizer: pads `input_ids` / `attention_mask` / `token_type_ids`.
        tasks: the model config's task entries (`name`, `type`, `labels`).
        pad_to_multiple_of: round the padded length up (helps tensor cores on GPU).
    """

    tokenizer: Any
    tasks: list[dict[str, Any]]
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        label_values = {
            task["name"]: [row.get(label_column_name(task["name"])) for row in features] for task in self.tasks
        }
        inputs = [{k: v for k, v in row.items() if not k.startswith(LABEL_PREFIX)} for row in features]
        batch = self.tokenizer.pad(
            inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )
        rows, length = batch["input_ids"].shape
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        labels = {}
        for task in self.tasks:
            values, task_type = label_values[task["name"]], task["type"]
            if task_type == "classification":
                labels[task["name"]] = torch.tensor(
                    [IGNORE_INDEX if v is None else int(v) for v in values], dtype=torch.long
                )
            elif task_type == "token_classification":
                tensor = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
                for row, value in enumerate(values):
                    if value:
                        value = torch.tensor(value[:length], dtype=torch.long)
                        if left:
                            tensor[row, length - len(value) :] = value
                        else:
                            tensor[row, : len(value)] = value
                labels[task["name"]] = tensor
            else:
                width = len(task["labels"])
                tensor = torch.full((rows, width), math.nan, dtype=torch.float32)
                for row, value in enumerate(values):
                    if value:
                        tensor[row] = torch.tensor(value, dtype=torch.float32)
                labels[task["name"]] = tensor
        batch = dict(batch)
        batch["labels"] = labels
        return batch


def count_labelled(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per task, the number of labelled items the model's loss averages over (same rule as `task_loss`)."""
    counts = {}
    for name, tensor in labels.items():
        if tensor.is_floating_point():
            counts[name] = (~torch.isnan(tensor)).sum()
        else:
            counts[name] = (tensor != IGNORE_INDEX).sum()
    return counts
