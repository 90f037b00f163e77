"""Multi-task data: load each task's dataset through `datasets`, resolve label sets, tokenise once with
`datasets.map`, align word labels to sub-tokens, and collate batches with dynamic padding.

Tasks that read the same rows (same dataset, splits, filters and input columns) share one *source*: each row is
tokenised once and carries a label for every task of that source, so a dataset labelled for several tasks trains all
of them from one encoder pass. A processed row holds two columns:

- `input_ids`: the token ids of each of the row's texts, `[[...]]` for single-text tasks, `[[a...], [b...]]` for
  similarity / pair classification, `[[anchor], [positive](, [negative])]` for contrastive tasks;
- `labels`: `{task: label}` for *every* task of the run (missing ones -100 or NaN: `layers_mtl.labelled_mask`), so
  that all sources concatenate into one `datasets.Dataset` and every batch carries every task;
- `token_type_ids` (only in runs with a task whose texts carry segments, e.g. a cross-encoder's joint pair): each
  text's token type ids, empty for texts without segments.

What a row of each task type holds, how its labels are read and collated, is the task type's (`tasks_mtl`); this
module loads the splits, groups tasks into sources and applies those rules.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    IterableDataset,
    IterableDatasetDict,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from transformers.utils import logging

from configuration_mtl import normalize_task
from layers_mtl import labelled_mask
from tasks_mtl import (
    DEFAULT_TASK_TYPE,
    LabelMapper,
    Task,
    integers_are_ids,
    is_missing,
    label_key,
    make_task,
    task_class,
)
from validation_mtl import DataError, InputError, UserError, check_int

logger = logging.get_logger(__name__)

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskDataSpec:
    """Where one task's data comes from and which columns hold its inputs and labels.

    Data keys (this class); every other key of a task dict (`head`, `loss_weight`, `threshold`, `loss`,
    `score_range`, `scale`, `pair_features`, `gather_across_processes`) is a model option, validated and documented
    by `configuration_mtl.normalize_task`, and kept in `model_options`.

    Args:
        name: task name (letters, digits, `_`, `-`).
        type: a task type (`tasks_mtl`: classification, multi_label_classification, token_classification,
            regression, similarity, pair_classification, contrastive, or a registered one).
        labels: label names; inferred from the training split (sorted) when omitted. With integer label columns
            and `labels` given, the integers index into `labels`.
        dataset: a Hub dataset id, a local data file (CSV/TSV/JSON/JSONL/Parquet), a local folder holding
            `<split>.<ext>` files, a folder written by `datasets.save_to_disk`, or (from Python) a `datasets`
            object: `Dataset`, `DatasetDict`, `IterableDataset` or `IterableDatasetDict`.
        dataset_config: Hub configuration name.
        hub_dataset: the Hub id of the dataset that local data is a copy of (e.g. `nyu-mll/glue`), for the model
            card's `model-index`, which names datasets by Hub id; local data without one is scored in the card's
            tables only.
        data_files: `{split: path}`, for local files named otherwise.
        text_column: the text; default the type's (`Task.default_columns`): `text`, for pair tasks the first
            text `sentence1`, for contrastive tasks the anchor `anchor`.
        text_pair_column: the second text of a pair (default `sentence2`), or the positive of a contrastive row
            (default `positive`).
        negative_column: contrastive only: a column holding a hard negative for every row (optional: without it,
            the batch's other positives are the only negatives).
        label_column: the label (default: the task's name); unused by contrastive tasks.
        tokens_column / tags_column: word list and per-word tag columns (token tasks).
        row_filter: `{column: value}`: keep only the rows whose columns hold these values (e.g. MRPC's paraphrase
            pairs for a contrastive task: `{label: 1}`).
        train_split / eval_split / test_split: split names; slicing such as `"train[:90%]"` works.
        max_train_samples / max_eval_samples / max_test_samples: keep a seeded random subset of this size (of a
            stream: the first rows after a seeded buffer shuffle).
        streaming: read the training split as a stream (`load_dataset(..., streaming=True)`): rows are tokenised as
            they are drawn and never held all at once. An `IterableDataset` given as `dataset` streams anyway. A
            streamed task needs its `labels` (they cannot be inferred without reading everything).
        num_train_rows: the size of a streamed training split, for the size-based sampling strategies
            (`temperature`, `proportional`); taken from the dataset's metadata when it has one.
        model_options: the model keys of the task dict.
    """

    name: str
    type: str = DEFAULT_TASK_TYPE
    labels: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    hub_dataset: str | None = None
    data_files: dict[str, str] | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    negative_column: str | None = None
    label_column: str | None = None
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    row_filter: dict[str, Any] | None = None
    train_split: str = "train"
    eval_split: str | None = "validation"
    test_split: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_test_samples: int | None = None
    streaming: bool = False
    num_train_rows: int | None = None
    model_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TaskDataSpec:
        if not isinstance(spec, dict):
            raise InputError(f"each task must be a dict, got {type(spec).__name__}: {spec!r}")
        if "name" not in spec:
            raise InputError(f"task {spec!r} has no 'name'")
        data_keys = {f.name for f in fields(cls)} - {"model_options"}
        result = cls(
            **{key: value for key, value in spec.items() if key in data_keys},
            model_options={key: value for key, value in spec.items() if key not in data_keys},
        )
        result._validate()
        return result

    @property
    def task_type(self) -> type[Task]:
        """The class of this task's type (`tasks_mtl`)."""
        return task_class(self.type, self.name)

    @property
    def task(self) -> Task:
        """The task object (labels must be resolved first)."""
        return make_task(self.model_task())

    def _validate(self) -> None:
        cls = self.task_type
        try:  # model options fail here, before any data is read (placeholder labels where they are inferred)
            placeholder = None if not cls.has_labels or cls.default_labels is not None else ["a", "b"]
            normalize_task(self._model_dict(self.labels if self.labels is not None else placeholder))
        except UserError as error:
            data_keys = sorted({f.name for f in fields(self)} - {"model_options"})
            raise InputError(f"{error} (data keys: {data_keys})") from None
        if self.dataset is None and not self.data_files:
            raise InputError(f"task '{self.name}': give `dataset` (Hub id, file or folder) or `data_files`")
        for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, key)
            if value is not None:
                check_int(f"task '{self.name}': {key}", value, 1)
        if self.hub_dataset is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hub_dataset if isinstance(self.hub_dataset, str) else "")
            except HFValidationError:
                raise InputError(
                    f"task '{self.name}': hub_dataset must be a Hub dataset id such as 'nyu-mll/glue', got "
                    f"{self.hub_dataset!r}"
                ) from None
        if self.negative_column is not None and not cls.hard_negatives:
            raise InputError(f"task '{self.name}': negative_column only applies to contrastive tasks")
        if self.row_filter is not None and not isinstance(self.row_filter, dict):
            raise InputError(f"task '{self.name}': row_filter must be a mapping of column -> value")
        first, second = cls.default_columns
        self.text_column = self.text_column or first
        self.text_pair_column = self.text_pair_column or second
        if not cls.takes_pairs and self.text_pair_column is not None:
            raise InputError(
                f"task '{self.name}': text_pair_column only applies to pair tasks (those that take text pairs)"
            )
        if self.label_column is None and cls.has_label_column:
            self.label_column = self.name

    def _model_dict(self, labels: list[str] | None) -> dict[str, Any]:
        task = {"name": self.name, "type": self.type, **self.model_options}
        if labels is not None:
            task["labels"] = labels
        return task

    def model_task(self) -> dict[str, Any]:
        """The task entry for `MultiTaskConfig(tasks=[...])` (labels must be resolved first)."""
        return normalize_task(self._model_dict(self.labels))

    @property
    def input_columns(self) -> list[str]:
        """The columns holding a row's texts, in the order the model reads them (word lists for token tasks)."""
        if self.task_type.reads_words:
            return [self.tokens_column]
        columns = [self.text_column]
        if self.task_type.takes_pairs:
            columns.append(self.text_pair_column)
        if self.negative_column:
            columns.append(self.negative_column)
        return columns

    @property
    def label_source(self) -> str | None:
        """The column holding this task's labels (`None` for contrastive tasks)."""
        return self.tags_column if self.task_type.reads_words else self.label_column

    def source_key(self) -> str:
        """Tasks with the same key read the same rows, tokenised the same way."""
        return json.dumps(
            [
                self.task_type.row_encoding,
                self.dataset,
                self.dataset_config,
                self.data_files,
                self.row_filter,
                self.train_split,
                self.eval_split,
                self.test_split,
                self.max_train_samples,
                self.max_eval_samples,
                self.max_test_samples,
            ],
            sort_keys=True,
            default=lambda value: f"<{type(value).__name__} at {id(value):#x}>",  # an in-memory dataset object
        )

    @property
    def is_stream(self) -> bool:
        return self.streaming or isinstance(self.dataset, (IterableDataset, IterableDatasetDict))

    def describe_dataset(self) -> str:
        if self.dataset is not None and not isinstance(self.dataset, str):
            return f"<in-memory {type(self.dataset).__name__}>"
        return self.dataset if self.dataset is not None else json.dumps(self.data_files, sort_keys=True)


def parse_task_specs(tasks: str | list | dict | None) -> list[TaskDataSpec]:
    """Task specs from a list of dicts, a `{name: spec}` mapping, a JSON string, or a JSON/YAML file path."""
    if tasks is None:
        raise InputError("no tasks given: pass --tasks (JSON list or a JSON/YAML file) or a config file with `tasks`")
    if isinstance(tasks, (str, os.PathLike)):
        tasks = _read_tasks_argument(str(tasks))
    if isinstance(tasks, dict):  # {name: spec} mapping
        tasks = [{"name": name, **spec} for name, spec in tasks.items()]
    if not isinstance(tasks, list):
        raise InputError(f"tasks must be a list of task dicts, got {type(tasks).__name__}")
    specs = [TaskDataSpec.from_dict(spec) for spec in tasks]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"duplicate task names {duplicates}")
    if not specs:
        raise InputError("the task list is empty")
    return specs


def _read_tasks_argument(text: str) -> Any:
    looks_like_path = text.endswith((".json", ".yaml", ".yml")) and not text.lstrip().startswith(("[", "{"))
    if looks_like_path and not os.path.isfile(text):
        raise InputError(f"--tasks file not found: {text}")
    if os.path.isfile(text):
        return read_json_or_yaml(text, "--tasks file")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise InputError(f"--tasks is neither a file nor valid JSON: {error}") from None
    except _DuplicateKey as error:
        raise InputError(f"--tasks: {error}") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key appears twice (`json` would silently keep the last value)."""
    keys = [key for key, _ in pairs]
    twice = next((key for index, key in enumerate(keys) if key in keys[:index]), None)
    if twice is not None:
        raise _DuplicateKey(f"key {twice!r} is given twice")
    return dict(pairs)


def _unique_key_yaml_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """`yaml.SafeLoader` that refuses a mapping key given twice (PyYAML silently keeps the last value); keys
        that a merge (`<<: *anchor`) brings in may still be overridden, as YAML intends."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.MarkedYAMLError(problem=f"key {key!r} is given twice", problem_mark=key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def read_json_or_yaml(path: str, what: str) -> Any:
    """The data of a JSON or YAML file (by its extension), or one error naming the file (`what`: how the user gave
    it) and, for a syntax error or a key given twice, the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{what} {path} is not UTF-8 text: {error}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.load(text, Loader=_unique_key_yaml_loader())  # noqa: S506 (a SafeLoader)
        except yaml.MarkedYAMLError as error:
            where = f" line {error.problem_mark.line + 1}" if error.problem_mark else ""
            context = ""
            if error.context and error.context_mark:  # where the construct that the problem breaks began
                context = f" ({error.context} at line {error.context_mark.line + 1})"
            raise InputError(f"{what} {path}{where}: {error.problem}{context}") from None
        except yaml.YAMLError as error:
            raise InputError(f"{what} {path} is not valid YAML: {error}") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} {path} line {error.lineno}: {error.msg}") from None
    except _DuplicateKey as error:
        raise InputError(f"{what} {path}: {error}") from None


# ---------------------------------------------------------------------------------------------- loading


def _split_base(split: str) -> str:
    return re.sub(r"\[.*\]$", "", split)


def _local_files(spec: TaskDataSpec) -> dict[str, str]:
    files = dict(spec.data_files or {})
    if spec.dataset is not None and not files:
        if os.path.isdir(spec.dataset):
            for candidate in sorted(Path(spec.dataset).iterdir()):
                if candidate.suffix in _FILE_BUILDERS and candidate.stem not in files:
                    files[candidate.stem] = str(candidate)
            if not files:
                raise DataError(f"task '{spec.name}': no CSV/JSON/JSONL/Parquet files in folder {spec.dataset}")
        elif os.path.isfile(spec.dataset):
            files = {"train": spec.dataset}
    return files


def _is_saved_dataset(path: str | None) -> bool:
    return (
        path is not None
        and os.path.isdir(path)
        and any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))
    )


def load_split(spec: TaskDataSpec, split: str, cache_dir: str | None = None) -> Dataset:
    """Load one split of a task's dataset: a `datasets` object, a `save_to_disk` folder, local files or folder, or a
    Hub id; the training split of a streamed task as an `IterableDataset`."""
    base = _split_base(split)
    stream = spec.streaming and split == spec.train_split
    if spec.dataset is not None and not isinstance(spec.dataset, (str, os.PathLike)):
        return _object_split(spec, split, base)
    if _is_saved_dataset(spec.dataset):
        return _load_saved_split(spec, split, base)
    files = _local_files(spec)
    if files:
        if base not in files:
            raise DataError(f"task '{spec.name}': split '{base}' not found; available files: {sorted(files)}")
        path = files[base]
        if not os.path.isfile(path):
            raise DataError(f"task '{spec.name}': data file for split '{base}' not found: {path}")
        suffix = Path(path).suffix
        if suffix not in _FILE_BUILDERS:
            raise DataError(f"task '{spec.name}': unsupported data file type '{suffix}' ({path})")
        if os.path.getsize(path) == 0:
            raise DataError(f"task '{spec.name}': data file {path} is empty")
        if suffix != ".parquet":
            _check_utf8(spec, path)  # Arrow would store invalid bytes and fail much later, deep inside `datasets`
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        if stream:
            return load_dataset(_FILE_BUILDERS[suffix], data_files={base: path}, split=base, streaming=True, **kwargs)
        try:
            dataset = load_dataset(
                _FILE_BUILDERS[suffix], data_files={base: path}, split=split, cache_dir=cache_dir, **kwargs
            )
        except Exception as error:  # datasets raises many kinds; find the line and say it plainly
            raise DataError(f"task '{spec.name}': {_diagnose_file(path, error)}") from None
        if len(dataset) == 0:
            raise DataError(f"task '{spec.name}': split '{split}' of {path} has no rows")
        return dataset
    try:
        if stream:
            return load_dataset(spec.dataset, spec.dataset_config, split=base, streaming=True)
        return load_dataset(spec.dataset, spec.dataset_config, split=split, cache_dir=cache_dir)
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (
            "the Hub is not reachable here (offline mode): download the dataset on a machine with access "
            "(`datasets.load_dataset(...).save_to_disk(folder)`) and give that folder, or local data files"
            if offline or "offline" in str(error).lower() or "connect" in str(error).lower()
            else "check the dataset id, `dataset_config` and split names"
        )
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"task '{spec.name}': could not load dataset '{spec.dataset}' split '{split}': {message}. {hint}"
        ) from None


def _object_split(spec: TaskDataSpec, split: str, base: str) -> Dataset | IterableDataset:
    """A split of a `datasets` object given as the task's `dataset` (from Python)."""
    data = spec.dataset
    if isinstance(data, (DatasetDict, IterableDatasetDict)):
        if base not in data:
            raise DataError(f"task '{spec.name}': split '{base}' not in the given dataset (splits: {sorted(data)})")
        data = data[base]
    elif base != "train":
        raise DataError(f"task '{spec.name}': the given {type(data).__name__} is a single split (no '{base}')")
    if isinstance(data, IterableDataset):
        if base != split:
            raise DataError(f"task '{spec.name}': a stream cannot be sliced ('{split}'): use max_train_samples")
        return data
    if not isinstance(data, Dataset):
        raise DataError(f"task '{spec.name}': dataset must be a path, a Hub id or a datasets object, got {type(data)}")
    return _slice(data, split, base)


def _slice(dataset: Dataset, split: str, base: str) -> Dataset:
    match = re.search(r"\[(.*)\]$", split)
    if not match:  # the same slicing syntax as load_dataset, e.g. "train[:90%]" or "train[-500:]"
        return dataset
    from datasets import ReadInstruction

    absolute = ReadInstruction.from_spec(f"{base}[{match.group(1)}]").to_absolute({base: len(dataset)})[0]
    return dataset.select(range(absolute.from_ or 0, absolute.to if absolute.to is not None else len(dataset)))


def _load_saved_split(spec: TaskDataSpec, split: str, base: str) -> Dataset:
    saved = load_from_disk(spec.dataset)
    if isinstance(saved, Dataset):
        if base != "train":
            raise DataError(f"task '{spec.name}': {spec.dataset} holds a single dataset (no '{base}' split)")
        dataset = saved
    else:
        if base not in saved:
            raise DataError(f"task '{spec.name}': split '{base}' not in {spec.dataset} (splits: {sorted(saved)})")
        dataset = saved[base]
    return _slice(dataset, split, base)


def _check_utf8(spec: TaskDataSpec, path: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"task '{spec.name}': {path} line {number} is not valid UTF-8 ({error.reason} at byte "
                    f"{error.start} of the line): re-save the file as UTF-8"
                ) from None


def _diagnose_file(path: str, error: Exception) -> str:
    """A one-line description of why `datasets` could not read `path`: the first bad line when one can be found."""
    suffix = Path(path).suffix
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as decode_error:
                return f"{path} line {number} is not valid UTF-8 ({decode_error.reason} at byte {decode_error.start})"
            if suffix in (".json", ".jsonl") and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as json_error:
                    if suffix == ".jsonl" or number > 1:
                        return f"{path} line {number} is not valid JSON: {json_error.msg} (column {json_error.colno})"
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return f"{path} could not be read as {suffix[1:].upper()}: {message}"


def _select_rows(
    spec: TaskDataSpec, dataset, limit: int | None, seed: int, split: str
) -> tuple[Dataset | IterableDataset, np.ndarray | None]:
    """The rows a task keeps of a split (`row_filter`, then a seeded subset of `limit` rows), and where each kept
    row sits in the split as loaded (None: every row, in order), so that a data error names the row the user can
    find. Only indices are computed: the data is neither copied nor rewritten."""
    wanted = dict(spec.row_filter or {})
    keep = lambda row: all(row[key] == value for key, value in wanted.items())  # noqa: E731
    if isinstance(dataset, IterableDataset):
        if wanted:
            dataset = dataset.filter(keep)
        return (dataset if limit is None else dataset.shuffle(seed=seed, buffer_size=10_000).take(limit)), None
    positions = None
    if wanted:
        missing = [column for column in wanted if column not in dataset.column_names]
        if missing:
            raise DataError(f"task '{spec.name}': row_filter column(s) {missing} not in the {split} split")
        columns = dataset.select_columns(list(wanted))[:]
        rows = (dict(zip(columns, values)) for values in zip(*columns.values()))
        positions = np.flatnonzero(np.fromiter(map(keep, rows), dtype=bool, count=len(dataset)))
        if not len(positions):
            raise DataError(f"task '{spec.name}': no {split} row matches row_filter {wanted}")
    count = len(dataset) if positions is None else len(positions)
    if limit is not None and limit < count:
        chosen = np.random.default_rng(seed).permutation(count)[:limit]  # the rows `Dataset.shuffle(seed)` puts first
        positions = chosen if positions is None else positions[chosen]
    if positions is None:
        return dataset, None
    return dataset.select(positions), positions


# ---------------------------------------------------------------------------------------------- labels


def _feature_names(feature: Any) -> list[str] | None:
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    return None


def resolve_labels(spec: TaskDataSpec, train: Dataset, source_rows: np.ndarray | None = None) -> list[str]:
    """The task's label names: from the spec, the dataset's `ClassLabel` feature, or the training split (sorted)."""
    cls = spec.task_type
    if spec.labels is not None:
        return [str(label) for label in spec.labels]
    if not cls.has_labels:
        return []
    if cls.default_labels is not None:
        return list(cls.default_labels)
    column = spec.label_source
    if isinstance(train, IterableDataset):
        names = _feature_names((train.features or {}).get(column))
        if names is None:
            raise DataError(
                f"task '{spec.name}': a streamed task needs its `labels` (they cannot be inferred without reading the "
                "whole stream), or a ClassLabel feature"
            )
        return names
    if column not in train.column_names:
        raise DataError(f"task '{spec.name}': column '{column}' not in the training split ({train.column_names})")
    names = _feature_names(train.features[column])
    if names is not None:
        return names
    keys, raw = set(), []
    rows = source_rows if source_rows is not None else range(len(train))
    for row, value in zip(rows, train[column]):
        where = f"train row {row}, column '{column}'"
        if cls.label_cell_is_list:
            if value is None:
                continue
            if not isinstance(value, list):
                raise DataError(f"task '{spec.name}': {where} must hold a list of labels, got {value!r:.60}")
            items = value
        else:
            items = [value]
        for item in items:
            if not is_missing(item):
                keys.add(label_key(spec.name, item, where))
                raw.append(item)
    if not keys:
        raise DataError(f"task '{spec.name}': no labels found in column '{column}' of the training split")
    stripped = sorted({item for item in raw if isinstance(item, str) and item != item.strip()})
    if stripped:
        logger.warning(f"task '{spec.name}': stripped surrounding whitespace from labels {stripped[:5]}")
    if all(re.fullmatch(r"-?\d+", key) for key in keys):
        return [str(key) for key in sorted(int(key) for key in keys)]
    return sorted(keys)


# ---------------------------------------------------------------------------------------------- processing


def _label_feature(task: Task) -> Any:
    """The `datasets` feature of a task's processed label (`Task.label_dtype`, `Task.label_per`)."""
    value = Value(task.label_dtype)
    return value if task.label_per == "row" else List(value)


@dataclass
class _RowContext:
    """What a task type may need of a row beside its label cell (`Task.convert_label`): its words and the
    tokenizer's word index of each token (token labels), and whether every sub-token carries the word's label."""

    words: list[str] | None
    word_ids: list[int | None] | None
    label_all_subtokens: bool


class _SourceTokenizer:
    """The `datasets.map` function of one source: tokenises the row's texts (as its tasks' type encodes rows) and
    converts every task's label (`Task.convert_label`)."""

    def __init__(
        self, source_specs, all_specs, tokenizer, max_seq_length, split, label_all_subtokens, ints_are_ids, source_rows
    ):
        self.specs = source_specs
        self.source_rows = source_rows  # each row's place in the split as loaded (`_select_rows`), for errors
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.split = split
        self.label_all_subtokens = label_all_subtokens and split == "train"
        self.names = {spec.name for spec in source_specs}
        self.tasks = {spec.name: spec.task for spec in source_specs}
        self.others = [make_task(spec.model_task()) for spec in all_specs if spec.name not in self.names]
        self.mappers = {
            spec.name: LabelMapper(spec.name, spec.labels, ints_are_ids[spec.name])
            for spec in source_specs
            if spec.labels
        }
        self.columns = source_input_columns(source_specs)
        self.encoder = source_specs[0].task_type  # every task of a source encodes its rows alike (`source_key`)
        self.words = any(spec.task_type.reads_words for spec in source_specs)
        self.negative_columns = {spec.negative_column for spec in source_specs if spec.negative_column}
        self.token_types = any(spec.task_type.uses_token_types for spec in all_specs)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if self.source_rows is not None:  # the rows as the user's file numbers them
            indices = [int(self.source_rows[index]) for index in indices]
        texts = [self._texts(batch, column, indices) for column in self.columns]  # per column, per row
        first, input_ids, token_types = self.encoder.tokenize_rows(
            self.tokenizer, texts, self.max_seq_length, self.words
        )
        rows = len(indices)
        labels = [{} for _ in range(rows)]
        for row in range(rows):
            context = _RowContext(
                words=batch[self.columns[0]][row] if self.words else None,
                word_ids=first.word_ids(row) if self.words else None,
                label_all_subtokens=self.label_all_subtokens,
            )
            for spec in self.specs:
                labels[row][spec.name] = self._label(spec, batch, row, indices[row], context)
            for task in self.others:
                labels[row][task.name] = task.missing_label(len(input_ids[row][0]))
        processed = {"input_ids": input_ids, "labels": labels}
        if self.token_types:
            processed["token_type_ids"] = token_types or [[[] for _ in row] for row in input_ids]
        return processed

    def _texts(self, batch: dict[str, list], column: str, indices: list[int]) -> list[Any]:
        values = batch[column]
        for position, value in enumerate(values):
            where = f"{self.split} row {indices[position]}, column '{column}'"
            if self.words and column == self.columns[0]:
                if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
                    raise DataError(f"tasks {sorted(self.names)}: {where} must hold a list of words, got {value!r:.80}")
            elif not isinstance(value, str):
                hint = (
                    " (negative_column gives every row a hard negative: fill it in, or leave out the rows without one)"
                    if column in self.negative_columns
                    else ""
                )
                raise DataError(f"tasks {sorted(self.names)}: {where} must hold a string, got {value!r:.80}{hint}")
            elif len(self.columns) > 1 and not value.strip():
                raise DataError(f"tasks {sorted(self.names)}: {where} is empty: every text of a pair must be given")
        return values

    def _label(self, spec: TaskDataSpec, batch: dict[str, list], row: int, index: int, context: _RowContext) -> Any:
        column = spec.label_source
        value = batch[column][row] if column else None
        where = f"{self.split} row {index}, column '{column}'"
        return self.tasks[spec.name].convert_label(value, where, self.mappers.get(spec.name), context)


def source_input_columns(source_specs: list[TaskDataSpec]) -> list[str]:
    """The input columns of a source: the word list when one of its tasks tags tokens (its sentence-level tasks then
    read the same words), else the columns every task of the source agrees on."""
    token_columns = {spec.tokens_column for spec in source_specs if spec.task_type.reads_words}
    layouts = {tuple(spec.input_columns) for spec in source_specs if not spec.task_type.reads_words}
    if token_columns:
        if len(token_columns) > 1 or any(len(layout) > 1 for layout in layouts):
            raise DataError(
                f"tasks {[s.name for s in source_specs]} share a dataset but cannot share its rows: token tasks "
                f"read word columns {sorted(token_columns)}, other tasks {sorted(layouts)}"
            )
        return [token_columns.pop()]
    if len(layouts) > 1:
        raise DataError(
            f"tasks {[s.name for s in source_specs]} share a dataset but read different input columns "
            f"{sorted(layouts)}: give them separate datasets or the same columns"
        )
    return list(layouts.pop())


def processed_features(specs: list[TaskDataSpec]) -> Features:
    """The schema of every processed split: nested token ids, one label per task, and token type ids when a task's
    texts carry segments."""
    features = {
        "input_ids": List(List(Value("int32"))),
        "labels": {spec.name: _label_feature(spec.task) for spec in specs},
    }
    if any(spec.task_type.uses_token_types for spec in specs):
        features["token_type_ids"] = List(List(Value("int8")))
    return Features(features)


def tokenize_source(
    dataset: Dataset,
    source_specs: list[TaskDataSpec],
    all_specs: list[TaskDataSpec],
    tokenizer: Any,
    max_seq_length: int,
    split: str,
    label_all_subtokens: bool = False,
    ints_are_ids: dict[str, bool] | None = None,
    source_rows: np.ndarray | None = None,
) -> Dataset:
    """Tokenise one source's split and convert its labels (see the module docstring for the row schema).
    `source_rows`: each row's place in the split as loaded, which data errors name (default: its index)."""
    columns = source_input_columns(source_specs)
    if any(spec.task_type.reads_words for spec in source_specs) and not getattr(tokenizer, "is_fast", False):
        raise DataError("token-classification tasks need a fast tokenizer (for word ids)")
    needed = columns + [s.label_source for s in source_specs if s.label_source]
    missing = [column for column in needed if dataset.column_names is not None and column not in dataset.column_names]
    if missing:
        raise DataError(
            f"tasks {[s.name for s in source_specs]}: column(s) {missing} not in the {split} split "
            f"(columns: {dataset.column_names})"
        )
    function = _SourceTokenizer(
        source_specs,
        all_specs,
        tokenizer,
        max_seq_length,
        split,
        label_all_subtokens,
        ints_are_ids or dict.fromkeys((s.name for s in source_specs), True),
        source_rows,
    )
    if isinstance(dataset, IterableDataset):  # tokenised lazily, as rows are drawn
        features = processed_features(all_specs)
        mapped = dataset.map(function, batched=True, with_indices=True, features=features)
        return mapped.select_columns(list(features))
    return dataset.map(
        function,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=processed_features(all_specs),
        desc=f"Tokenizing {split} ({', '.join(sorted(function.names))})",
    )


def count_labelled_rows(dataset: Dataset, task: str) -> int:
    """Rows of a processed split that carry at least one label for `task` (the `labelled_mask` rule)."""
    column = dataset.data.column("labels").combine_chunks().field(task)
    if isinstance(column.type, pa.ListType):
        flat = column.flatten().to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        labelled = labelled_mask(torch.from_numpy(np.array(flat))).numpy()
        return int(np.unique(parents[labelled]).size)
    values = column.to_numpy(zero_copy_only=False)
    return int(labelled_mask(torch.from_numpy(np.array(values))).sum())


@dataclass
class MultiTaskData:
    """Processed datasets for multi-task training.

    Attributes:
        specs: the task specs, labels resolved.
        train: all sources' training rows, concatenated in source order; or, when a source streams, the
            `StreamedSources` (`MultiTaskTrainer` draws their batches with the task-sampling strategy).
        source_sizes: rows per source (the task sampler draws batches per source); `None` for a stream of unknown
            size.
        source_tasks: the task names of each source.
        eval / test: concatenated eval / test rows (or `None`).
        num_train_examples: per task, the number of labelled training rows.
        examples: per task, a few raw inputs (texts, word lists or pairs) of its eval split (or training split) to
            show predictions on (the end-of-run report, the model card's widget).
    """

    specs: list[TaskDataSpec]
    train: Dataset | StreamedSources
    source_sizes: list[int | None]
    source_tasks: list[list[str]]
    eval: Dataset | None = None
    test: Dataset | None = None
    num_train_examples: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Any]] = field(default_factory=dict)

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
        max_seq_length: truncation length in tokens (`validation_mtl.resolve_max_seq_length`).
        label_all_subtokens: label every sub-token of a word in training (`B-` becomes `I-` after the first);
            evaluation always scores the first sub-token, so metrics stay per word.
        seed: seed of the `max_*_samples` subsets.
        do_eval: load eval splits (and check their labels).
    """
    sources: dict[str, list[TaskDataSpec]] = {}
    for spec in specs:
        sources.setdefault(spec.source_key(), []).append(spec)

    parts: dict[str, list[Dataset]] = {"train": [], "eval": [], "test": []}
    sizes, source_tasks, examples = [], [], {}
    num_train_examples: dict[str, int | None] = {}
    # Every task's labels first: a row of one source holds a missing label for every other source's tasks, shaped
    # by their label lists.
    loaded = []
    for group in sources.values():
        first = group[0]
        train = load_split(first, first.train_split, cache_dir)
        train, train_rows = _select_rows(first, train, first.max_train_samples, seed, "train")
        ints_are_ids = {}
        for spec in group:
            features = train.features or {}
            feature = features.get(spec.label_source) if spec.label_source else None
            ints_are_ids[spec.name] = integers_are_ids(spec.labels, _feature_names(feature) is not None)
            spec.labels = resolve_labels(spec, train, train_rows)
        loaded.append((group, train, train_rows, ints_are_ids))
    for group, train, train_rows, ints_are_ids in loaded:
        first = group[0]
        processed = tokenize_source(
            train, group, specs, tokenizer, max_seq_length, "train", label_all_subtokens, ints_are_ids, train_rows
        )
        parts["train"].append(processed)
        sizes.append(_source_size(first, processed))
        source_tasks.append([spec.name for spec in group])
        for spec in group:
            if isinstance(processed, IterableDataset):
                num_train_examples[spec.name] = None  # a stream is never counted: that would read all of it
                continue
            num_train_examples[spec.name] = count_labelled_rows(processed, spec.name)
            if num_train_examples[spec.name] == 0:
                raise DataError(f"task '{spec.name}': none of the {len(processed)} training rows has a label")
        for key, split, limit in (
            ("eval", first.eval_split if do_eval else None, first.max_eval_samples),
            ("test", first.test_split, first.max_test_samples),
        ):
            if not split:
                continue
            raw, rows = _select_rows(first, load_split(first, split, cache_dir), limit, seed, f"{key} split '{split}'")
            if isinstance(raw, IterableDataset):
                raise DataError(f"task '{first.name}': the {key} split must be a finite dataset, not a stream")
            if key == "eval":
                examples.update({spec.name: _raw_inputs(raw, first, 2) for spec in group})
            name = f"{key} split '{split}'"
            parts[key].append(
                tokenize_source(raw, group, specs, tokenizer, max_seq_length, name, False, ints_are_ids, rows)
            )
        if not isinstance(train, IterableDataset):
            for spec in group:
                examples.setdefault(spec.name, _raw_inputs(train, first, 2))
    streamed = any(isinstance(part, IterableDataset) for part in parts["train"])
    return MultiTaskData(
        specs=specs,
        train=StreamedSources(parts["train"], sizes) if streamed else _concatenate(parts["train"]),
        source_sizes=sizes,
        source_tasks=source_tasks,
        eval=_concatenate(parts["eval"]),
        test=_concatenate(parts["test"]),
        num_train_examples=num_train_examples,
        examples=examples,
    )


def _source_size(spec: TaskDataSpec, processed) -> int | None:
    if not isinstance(processed, IterableDataset):
        return len(processed)
    if spec.num_train_rows is not None:
        return spec.num_train_rows
    splits = getattr(processed.info, "splits", None) or {}
    known = splits.get(_split_base(spec.train_split))
    return getattr(known, "num_examples", None) or None


@dataclass
class StreamedSources:
    """The training sources of a run with at least one stream: one `IterableDataset` of processed rows per source
    (in-memory sources included, as iterables), and their sizes (`None` where unknown). `MultiTaskTrainer` turns
    them into a `MultiTaskStream` that draws each batch from one source, as `MultiTaskSampler` does for datasets."""

    sources: list
    sizes: list[int | None]

    def __post_init__(self):
        self.sources = [s if isinstance(s, IterableDataset) else s.to_iterable_dataset() for s in self.sources]


def _concatenate(parts: list[Dataset]) -> Dataset | None:
    if not parts:
        return None
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _raw_inputs(dataset: Dataset, spec: TaskDataSpec, count: int) -> list[Any]:
    """A few raw inputs (texts, word lists, or pairs as tuples) to show example predictions on."""
    columns = spec.input_columns[:2]
    if any(column not in dataset.column_names for column in columns):
        return []
    rows = dataset.select(range(min(count, len(dataset))))
    if len(columns) == 1:
        return [value for value in rows[columns[0]] if value]
    return [tuple(pair) for pair in zip(rows[columns[0]], rows[columns[1]]) if all(pair)]


# ---------------------------------------------------------------------------------------------- collator


@dataclass
class MultiTaskCollator:
    """Pads a batch to its longest text (dynamic padding, on the right) and builds `labels={task: tensor}`.

    `input_ids` / `attention_mask` (and `token_type_ids`, when rows carry them) come out as `(batch, seq)` when every
    row has one text, else as `(batch, texts, seq)` (rows with fewer texts get all-padding ones, which the model
    skips). Every task gets a label tensor in every batch (`Task.collate_labels`), all missing when no row is
    labelled for it (a row without an entry for a task, e.g. built for fewer tasks than the model has, counts as
    missing), so every head takes part in every loss (a zero that depends on its weights): distributed training
    then never sees a parameter without a gradient.

    Args:
        tokenizer: gives the padding id.
        tasks: the model config's task entries (`name`, `type`, `labels`).
        pad_to_multiple_of: round the padded length up (helps tensor cores on GPU).
    """

    tokenizer: Any
    tasks: list[dict[str, Any]]
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        self._tasks = [make_task(task) for task in self.tasks]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [row["input_ids"] for row in features]
        rows, num_texts = len(texts), max(len(row) for row in texts)
        length = max(len(ids) for row in texts for ids in row)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((rows, num_texts, length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, num_texts, length), dtype=torch.long)
        segments = [row.get("token_type_ids") for row in features]
        token_type_ids = torch.zeros_like(input_ids) if any(any(s) for s in segments if s) else None
        for row, row_texts in enumerate(texts):
            for position, ids in enumerate(row_texts):
                input_ids[row, position, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, position, : len(ids)] = 1
                if token_type_ids is not None and segments[row] and segments[row][position]:
                    token_type_ids[row, position, : len(ids)] = torch.tensor(segments[row][position], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if num_texts == 1:
            batch = {key: value[:, 0] for key, value in batch.items()}
        batch["labels"] = {
            task.name: task.collate_labels(
                [row["labels"].get(task.name, task.missing_label(len(row["input_ids"][0]))) for row in features],
                length,
            )
            for task in self._tasks
        }
        return batch
