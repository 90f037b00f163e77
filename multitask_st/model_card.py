"""Model cards for saved multi-task models, built from what the model folder records.

`write_model_card(folder)` reads `config.json` (architecture and tasks), and when present `metrics.json`,
`training_config.json` and `trainer_state.json` (formats written by `train.py`), and renders
`templates/model_card.md` through `huggingface_hub.ModelCard`, so that the YAML metadata (tags, base model,
datasets, `model-index` with one result per task, split and metric) is what the Hub reads. Nothing is invented:
a section whose source file is missing says so instead of showing numbers.

How each task is described (its head, prediction format, Hub task type and tag) is its task type's (`tasks_mtl`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from io_mtl import MODEL_COMMIT_FILE, SENTENCE_TRANSFORMERS_MODULES
from multitask_st import DEFAULT_BACKBONE_ID, default_backbone
from tasks_mtl import DEFAULT_TASK_TYPE, make_task, task_class
from validation_mtl import InputError, MissingFileError, is_number

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
CURVES_FIGURE = "training_curves.png"
# This project's metric names as the Hub's metric ids (`evaluate` metrics) and their arguments.
HUB_METRICS = {
    "accuracy": ("accuracy", None),
    "macro_f1": ("f1", {"average": "macro"}),
    "micro_f1": ("f1", {"average": "micro"}),
    "f1": ("f1", None),
    "precision": ("precision", None),
    "recall": ("recall", None),
    "spearman": ("spearmanr", None),
    "pearson": ("pearsonr", None),
    "mrr": ("mrr", None),
    "recall_at_1": ("recall", {"k": 1}),
}
# Metrics worth reporting in `model-index`; losses stay in the body tables (they are not comparable across models).
_NOT_METRICS = {"loss", "runtime", "samples_per_second", "steps_per_second"}
_HUB_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.\-]*/)?[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAX_CURVE_ROWS = 25
_FRAMEWORKS = ("transformers", "torch", "huggingface_hub", "tokenizers", "safetensors", "datasets", "accelerate")


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None


def hub_dataset_id(dataset: str | None) -> str | None:
    """`dataset` if it is a Hub dataset id (`name` or `namespace/name`), `None` for local paths or file specs."""
    if not dataset or os.path.exists(dataset) or dataset.startswith((".", "/", "{", "~")):
        return None
    return dataset if _HUB_REPO_ID.match(dataset) else None


def _dataset_label(dataset: str | None) -> str:
    """A short name for a dataset: the Hub id, or the folder/file name of local data."""
    if not dataset:
        return "unknown"
    if hub_dataset_id(dataset):
        return dataset
    if dataset.startswith("{"):  # data_files given as a JSON mapping
        try:
            files = json.loads(dataset)
            first = next(iter(files.values()))
            first = first[0] if isinstance(first, list) else first
            return Path(str(first)).parent.name or Path(str(first)).stem
        except (ValueError, StopIteration, AttributeError):
            return "local files"
    return Path(dataset.rstrip("/")).name or dataset


def _hub_id_of(info: dict[str, Any]) -> str | None:
    """The Hub id of a task's data: its `dataset` when that is one, else the `hub_dataset` its spec names for a local
    copy; `None` for local data with neither (the `model-index` names datasets by Hub id only)."""
    return hub_dataset_id(info.get("dataset")) or info.get("hub_dataset")


def _dataset_row(task_name: str, info: dict[str, Any]) -> dict[str, Any]:
    """One row of the card's data table: a Hub link, or for local data its name, size and columns."""
    dataset = info.get("dataset")
    hub_id = _hub_id_of(info)
    if hub_dataset_id(dataset):
        name = f"[{hub_id}](https://huggingface.co/datasets/{hub_id})"
    elif hub_id:
        name = f"`{_dataset_label(dataset)}`, a local copy of [{hub_id}](https://huggingface.co/datasets/{hub_id})"
    else:
        name = f"`{_dataset_label(dataset)}` (local data, not on the Hub)"
    columns = [*(info.get("input_columns") or []), *([info["label_column"]] if info.get("label_column") else [])]
    return {
        "task": task_name,
        "dataset": name,
        "config": info.get("dataset_config") or "-",
        "columns": ", ".join(f"`{column}`" for column in columns) or "-",
        "filter": json.dumps(info["row_filter"]) if info.get("row_filter") else "-",
        "train_split": info.get("train_split") or "-",
        "rows": info.get("num_train_rows", "-"),
        "num_train_examples": info.get("num_train_examples", "-"),
        "eval_split": info.get("eval_split") or "-",
        "test_split": info.get("test_split") or "-",
    }


def _widget(tasks: list[dict[str, Any]], task_info: dict[str, dict]) -> list[dict[str, Any]] | None:
    """One widget example per task, from the task's own data, titled with the task's name: a text to embed, the form
    of the card's `feature-extraction` pipeline tag (a pair task's example gives its first text)."""
    widget = []
    for task in tasks:
        examples = (task_info.get(task["name"]) or {}).get("examples") or []
        example = examples[0] if examples else None
        if isinstance(example, list) and make_task(task).takes_pairs:
            widget.append({"text": example[0], "example_title": task["name"]})
        elif isinstance(example, list):
            widget.append({"text": " ".join(example), "example_title": task["name"]})
        elif isinstance(example, str):
            widget.append({"text": example, "example_title": task["name"]})
    return widget or None


def _embedding_view(metrics: dict[str, Any], tasks: list[dict], training: dict[str, Any]) -> dict[str, Any]:
    """How the embedding was trained and kept: protection, embedding tasks, drift from the base, similarity scores."""
    protection = training.get("embedding_protection") or {}
    embedding_tasks = [t["name"] for t in tasks if make_task(t).trains_embedding]
    drift = [
        {"split": split, "cosine": _format_number(values.get("cosine_to_initial")),
         "overlap": _format_number(next((v for k, v in values.items() if k.startswith("knn")), None))}
        for split, values in (metrics.get("embedding") or {}).items()
    ]  # fmt: skip
    similarity = [
        {"task": name, "split": split, "spearman": _format_number(scores.get("spearman"))}
        for split in ("eval", "test")
        for name, scores in (metrics.get(split) or {}).items()
        if name in embedding_tasks and "spearman" in scores
    ]
    return {
        "protection": protection.get("method"),
        "weight": protection.get("weight"),
        "tasks": embedding_tasks,
        "drift": drift,
        "similarity": similarity,
    }


def _base_model_id(base_model: str | None) -> str | None:
    """The Hub id of the base model when it is one (the offline copy of the default backbone maps to its id)."""
    if not base_model:
        return None
    try:
        if os.path.realpath(base_model) == os.path.realpath(default_backbone()):
            return DEFAULT_BACKBONE_ID
    except Exception:  # pragma: no cover - the default backbone package is optional
        pass
    return base_model if hub_dataset_id(base_model) else None


def _base_model_metadata(base_model: str | None) -> dict[str, Any]:
    """Language and license from the base model's own card, when it is available locally (never downloaded)."""
    candidates = []
    if base_model and os.path.isdir(base_model):
        candidates.append(Path(base_model) / "README.md")
    if _base_model_id(base_model) == DEFAULT_BACKBONE_ID:
        if os.path.isdir(default_backbone()):
            candidates.append(Path(default_backbone()) / "README.md")
    for readme in candidates:
        if readme.is_file():
            try:
                data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
            except Exception:
                continue
            return {key: data[key] for key in ("language", "license") if data.get(key)}
    return {}


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _task_rows(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for spec in tasks:
        task = make_task(spec)
        labels = spec.get("labels") or []
        shown = ", ".join(f"`{label}`" for label in labels[:20]) + (
            f" … ({len(labels)} labels)" if len(labels) > 20 else ""
        )
        rows.append(
            {
                "name": task.name,
                "type": task.describe_type(),
                "labels_text": shown if task.has_labels else "-",
                "head_text": task.describe_head(),
                "loss_weight": spec.get("loss_weight", 1.0),
                "predict_hint": task.predict_hint,
                "pair": task.takes_pairs,
            }
        )
    return rows


def _architecture(config: dict[str, Any]) -> tuple[str, str, str]:
    backbone = config.get("backbone_config") or {}
    model_type = backbone.get("model_type", "unknown")
    layers = backbone.get("num_hidden_layers") or backbone.get("n_layers")
    hidden = backbone.get("hidden_size") or backbone.get("dim")
    heads = backbone.get("num_attention_heads") or backbone.get("n_heads")
    backbone_line = (
        f"{model_type}" + (f", {layers} layers" if layers else "") + (f", hidden size {hidden}" if hidden else "")
    )
    backbone_line += f", {heads} attention heads" if heads else ""
    embedding_dim = config.get("projection_dim") or hidden
    pooling = config.get("pooling", "mean")
    embedding_line = f"{embedding_dim} dimensions, {pooling} pooling"
    if config.get("projection_dim"):
        embedding_line += f", linear projection {hidden} -> {config['projection_dim']}"
        if config.get("projection_activation"):
            embedding_line += f" + {config['projection_activation']}"
    embedding_line += ", L2-normalised" if config.get("normalize") else ", not normalised"
    embedding_line += f"; texts truncated to {config.get('max_seq_length', 256)} tokens"
    parts = [
        f"1. **Encoder**: `{backbone.get('architectures', ['AutoModel'])[0]}` ({backbone_line}), without its pooler.",
        f"2. **Pooling**: `{pooling}` over the token states, ignoring padding.",
    ]
    if config.get("projection_dim"):
        parts.append(
            f"3. **Projection**: a linear layer to {config['projection_dim']} dimensions"
            + (f" followed by `{config['projection_activation']}`." if config.get("projection_activation") else ".")
        )
    parts.append(
        f"{len(parts) + 1}. **Embedding**: the pooled{' and projected' if config.get('projection_dim') else ''} "
        f"vector{' (L2-normalised)' if config.get('normalize') else ''} is the sentence embedding; the heads "
        "read it before normalisation."
    )
    parts.append(
        f"{len(parts) + 1}. **Heads**: one per task. Sentence-level tasks (classification, multi-label, "
        "regression) read the sentence vector (or their own attention pooling), token classification each token "
        "state; pair tasks embed both texts in the same encoder pass (similarity and contrastive tasks score the "
        "cosine of the two embeddings, pair classification reads (u, v, |u-v|))."
    )
    return backbone_line, embedding_line, "\n".join(parts)


def _metric_results(
    metrics: dict[str, Any], training: dict[str, Any] | None, tasks: dict[str, dict]
) -> tuple[list[EvalResult], list[dict[str, Any]]]:
    """`EvalResult`s for the model-index and the per-split tables of the card body."""
    results, sections = [], []
    task_info = (training or {}).get("tasks", {})
    # huggingface_hub groups model-index results by (task type, dataset, config, split): tasks trained on one
    # dataset (several label columns) would merge into one result, so those get their label column as config.
    shared = _tasks_sharing_a_dataset(task_info, tasks)
    for split_key, title in (("eval", "Validation"), ("test", "Test")):
        per_task = metrics.get(split_key)
        if not isinstance(per_task, dict) or not per_task:
            continue
        rows = []
        for task_name, scores in per_task.items():
            info = task_info.get(task_name, {})
            split = info.get(f"{split_key}_split") or ("validation" if split_key == "eval" else "test")
            dataset = info.get("dataset")
            hub_task = task_class(
                (tasks.get(task_name) or {}).get("type") or info.get("type") or DEFAULT_TASK_TYPE
            ).hub_task
            for metric, value in scores.items():
                if not is_number(value):
                    continue
                rows.append({"task": task_name, "split": split, "metric": metric, "value": _format_number(value)})
                hub_id = _hub_id_of(info)
                if metric in _NOT_METRICS or metric not in HUB_METRICS or hub_id is None:
                    continue  # local data without a Hub id: scored in the tables, not in the `model-index`
                metric_type, metric_args = HUB_METRICS[metric]
                results.append(
                    EvalResult(
                        task_type=hub_task,
                        task_name=task_name,
                        dataset_type=hub_id,
                        dataset_name=_dataset_label(dataset) if hub_dataset_id(dataset) else hub_id,
                        dataset_config=_label_config(info, task_name)
                        if task_name in shared
                        else info.get("dataset_config"),
                        dataset_split=split,
                        metric_type=metric_type,
                        metric_args=metric_args,
                        metric_name=f"{task_name} {metric.replace('_', ' ')}",
                        metric_value=float(value),
                    )
                )
        combined_key = "combined_score" if split_key == "eval" else "test_combined_score"
        combined = metrics.get(combined_key)
        sections.append(
            {
                "title": f"{title} ({split_key} split)",
                "rows": rows,
                "combined": _format_number(combined) if is_number(combined) else None,
            }
        )
    return results, sections


def _tasks_sharing_a_dataset(task_info: dict[str, dict], tasks: dict[str, dict]) -> set[str]:
    groups: dict[tuple, list[str]] = {}
    for name, info in task_info.items():
        task_type = (tasks.get(name) or {}).get("type") or info.get("type") or DEFAULT_TASK_TYPE
        key = (task_class(task_type).hub_task, info.get("dataset"), info.get("dataset_config"))
        groups.setdefault(key, []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}


def _label_config(info: dict[str, Any], task_name: str) -> str:
    column = info.get("label_column") or task_name
    return f"{info['dataset_config']}/{column}" if info.get("dataset_config") else column


def _curves(state: dict[str, Any], folder: Path, figure: bool) -> dict[str, Any] | None:
    history = [entry for entry in state.get("log_history") or [] if isinstance(entry, dict)]
    by_step: dict[int, dict[str, Any]] = {}
    for entry in history:
        # Train logs carry `loss` (+ `loss/<task>`), eval logs `eval_*`; the final summary (train_loss, runtime)
        # and test logs are not curve points.
        keys = {
            k: v
            for k, v in entry.items()
            if is_number(v)
            and (k == "loss" or k.startswith("loss/") or k.startswith("eval_"))
            and not k.endswith(("_runtime", "_per_second"))
        }
        if keys and "step" in entry:
            by_step.setdefault(int(entry["step"]), {"epoch": entry.get("epoch")}).update(keys)
    if not by_step:
        return None
    keys = sorted(
        {k for row in by_step.values() for k in row if k != "epoch"},
        key=lambda k: (k != "loss", not k.startswith("loss/"), k != "eval_loss", k),
    )
    steps = sorted(by_step)
    shown = steps
    if len(steps) > _MAX_CURVE_ROWS:
        stride = (len(steps) - 1) / (_MAX_CURVE_ROWS - 1)
        shown = sorted({steps[round(i * stride)] for i in range(_MAX_CURVE_ROWS)})
    rows = []
    for step in shown:
        row = by_step[step]
        epoch = row.get("epoch")
        rows.append(
            [str(step), f"{epoch:.2f}" if is_number(epoch) else ""]
            + [_format_number(row[k]) if k in row else "" for k in keys]
        )
    # A figure drawn before (train.py's, which push_to_hub.py publishes without redrawing) is shown too.
    figure_name = CURVES_FIGURE if (folder / CURVES_FIGURE).is_file() else None
    if figure:
        try:
            from multitask_st.plots import training_curves

            training_curves(state, folder / CURVES_FIGURE)
            figure_name = CURVES_FIGURE
        except Exception:  # matplotlib is optional (the `serve` extra); the table carries the same numbers
            pass
    return {
        "columns": ["step", "epoch", *keys],
        "rows": rows,
        "subsampled": len(shown) < len(steps),
        "shown": len(shown),
        "total": len(steps),
        "figure": figure_name,
    }


def _versions() -> list[tuple[str, str]]:
    versions = [("Python", platform.python_version())]
    for name in _FRAMEWORKS:
        try:
            versions.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def build_model_card(
    folder: str | os.PathLike, repo_id: str | None = None, figure: bool = True, name: str | None = None, **overrides
) -> ModelCard:
    """Build (without writing) the model card of a saved multi-task model.

    Args:
        folder: the saved model (a `save_pretrained` / `train.py` output folder).
        repo_id: the Hub repo the model is (or will be) published as; used in the title and usage example.
        figure: also draw `training_curves.png` from `trainer_state.json` when matplotlib is available.
        name: the model's name in the title and metadata (default: the repo's name, else the folder's; a card
            written in a staging folder passes the name of the folder the model is moved to).
        overrides: metadata fields that win over what is derived (`license`, `language`, `base_model`, `datasets`,
            `tags` (added to the derived ones), `model_name`, or any other `ModelCardData` field).
    """
    folder = Path(folder)
    config, metrics, training, state = _read_records(folder)
    tasks = config.get("tasks") or []
    tasks_by_name = {task["name"]: task for task in tasks}
    base_model = _base_model(config, training)
    name = name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    embedding_dim = config.get("projection_dim") or (config.get("backbone_config") or {}).get("hidden_size")
    loads_in_sentence_transformers = (folder / SENTENCE_TRANSFORMERS_MODULES).is_file()

    eval_results, evaluation = _metric_results(metrics, training, tasks_by_name)
    tags = _tags(tasks, loads_in_sentence_transformers, overrides.pop("tags", None))
    card_data = _card_data(tags, eval_results, name, base_model, tasks, training, overrides)
    training_view = _training_view(training, card_data.base_model)
    backbone_line, embedding_line, architecture = _architecture(config)
    task_rows = _task_rows(tasks)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=name,
        summary=_summary(len(tasks), list(tasks_by_name), embedding_dim, card_data.base_model, base_model),
        backbone_line=backbone_line,
        embedding_line=embedding_line,
        architecture=architecture,
        tasks=task_rows,
        task_names=[f"`{t}`" for t in tasks_by_name],
        repo_id=repo_id or f"<namespace>/{name}",
        revision_example="<commit hash>",
        embedding_dim=embedding_dim,
        normalize=bool(config.get("normalize")),
        example_sentences='["The movie was great!", "Where is the Eiffel Tower?"]',
        training=training_view,
        evaluation=evaluation,
        curves=_curves(state, folder, figure) if isinstance(state, dict) else None,
        embedding=_embedding_view(metrics, tasks, training or {}),
        sentence_transformers=loads_in_sentence_transformers,
        pair_example=next((row for row in task_rows if row["pair"]), None),
        limitations=_limitations(config, tasks, metrics, training, bool(training_view)),
        versions=_versions(),
    )


def _base_model(config: dict[str, Any], training: Any | None) -> str | None:
    """What the model was fine-tuned from: the training record's base model, else the encoder config's origin."""
    return (training or {}).get("base_model") or (config.get("backbone_config") or {}).get("_name_or_path")


def _read_records(folder: Path) -> tuple[dict[str, Any], dict[str, Any], Any | None, Any | None]:
    """`config.json` (required), then `metrics.json`, `training_config.json` and `trainer_state.json` if present."""
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise MissingFileError(f"model folder {folder}: no config.json, is this a saved model?")
    if "tasks" not in config or "backbone_config" not in config:
        raise InputError(f"{folder / 'config.json'} is not a multi-task model config (no `tasks`/`backbone_config`)")
    metrics = _read_json(folder / "metrics.json") or {}
    training = _read_json(folder / "training_config.json")
    state = _read_json(folder / "trainer_state.json")
    return config, metrics, training, state


def _tags(tasks: list[dict[str, Any]], sentence_transformers: bool, extra: list[str] | None) -> list[str]:
    """The card's tags: the project's, one per task type, then the caller's extra tags."""
    tags = ["multi-task", "sentence-embeddings", "feature-extraction", "custom_code"]
    if sentence_transformers:
        tags.append("sentence-transformers")
    tags += list(dict.fromkeys(make_task(task).card_tag for task in tasks))
    tags += [tag for tag in extra or [] if tag not in tags]
    return tags


def _card_data(
    tags: list[str],
    eval_results: list[EvalResult],
    name: str,
    base_model: str | None,
    tasks: list[dict[str, Any]],
    training: dict[str, Any] | None,
    overrides: dict[str, Any],
) -> ModelCardData:
    """The card's YAML metadata (what the Hub reads); `overrides` win over what is derived."""
    datasets = sorted({_hub_id_of(info) for info in (training or {}).get("tasks", {}).values()} - {None})
    fields: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "feature-extraction",
        "tags": tags,
        "base_model": _base_model_id(base_model),
        "datasets": datasets or None,
        "metrics": sorted({result.metric_type for result in eval_results}) or None,
        **_base_model_metadata(base_model),
    }
    if eval_results:
        fields.update(model_name=name, eval_results=eval_results)
    widget = _widget(tasks, (training or {}).get("tasks", {}))
    if widget:
        fields["widget"] = widget
    fields.update(overrides)
    return ModelCardData(**{key: value for key, value in fields.items() if value is not None})


def _summary(
    count: int, names: list[str], embedding_dim: Any, base_model_id: str | None, base_model: str | None
) -> str:
    """The card's opening paragraph: the embedding, the `count` heads (`names`), and where the encoder came from."""
    summary = (
        f"A multi-task sentence transformer: one shared encoder turns a text into a {embedding_dim}-dimensional "
        f"sentence embedding, and {count} small head{'s' if count != 1 else ''} "
        f"({', '.join(f'`{t}`' for t in names) or 'none'}) predict{'s' if count == 1 else ''} "
        "from the same forward pass."
    )
    if base_model_id:
        summary += f" The encoder was initialised from [`{base_model_id}`](https://huggingface.co/{base_model_id})."
    elif base_model:
        summary += f" The encoder was initialised from `{base_model}` (a local checkpoint)."
    return summary


def _training_view(training: Any | None, base_model_id: str | None) -> dict[str, Any] | None:
    """The card's training section: base model, hardware, runtime, hyperparameters and data (None: no record)."""
    if not isinstance(training, dict):
        return None
    hyperparameters = sorted((training.get("hyperparameters") or {}).items())
    runtime = training.get("train_runtime_s")
    return {
        "base_model": base_model_id or training.get("base_model"),
        "hardware": training.get("hardware"),
        "precision": (training.get("hardware_details") or {}).get("precision"),
        "threads": (training.get("hardware_details") or {}).get("torch_threads"),
        "runtime": f"{runtime:.0f} s" if is_number(runtime) else None,
        "hyperparameters": [
            (key, json.dumps(value, default=str).replace("|", "\\|")) for key, value in hyperparameters
        ],
        "datasets": [_dataset_row(task_name, info) for task_name, info in (training.get("tasks") or {}).items()],
    }


def _limitations(
    config: dict[str, Any],
    tasks: list[dict[str, Any]],
    metrics: dict[str, Any],
    training: Any | None,
    trained: bool,
) -> list[str]:
    """The card's limitations: remote code, truncation, closed label sets, the embedding, the evidence."""
    limitations = [
        "Loading needs `trust_remote_code=True`: the Python files of this repository run on your machine. Review "
        "them and pin `revision` to a commit hash.",
        f"Texts longer than {config.get('max_seq_length', 256)} tokens are truncated.",
        "Each head only knows the labels listed above; out-of-domain texts still get one of them, often with high "
        "confidence.",
        _embedding_limitation(tasks, metrics, training or {}),
    ]
    if trained:
        limitations.append(
            "The reported scores come from the splits listed above only; performance on other "
            "domains, languages or label definitions is unknown."
        )
    else:
        limitations.append("No training record was found: the task heads may be untrained.")
    return limitations


def _embedding_limitation(tasks: list[dict], metrics: dict[str, Any], training: dict[str, Any]) -> str:
    trained = [t["name"] for t in tasks if make_task(t).trains_embedding]
    drift = (metrics.get("embedding") or {}).get("eval") or {}
    cosine = drift.get("cosine_to_initial")
    moved = f" (mean cosine to the base model's embedding on the eval texts: {cosine:.3f})" if is_number(cosine) else ""
    if trained:
        return f"The embedding was trained by {', '.join(f'`{t}`' for t in trained)}{moved}: it is tuned to those data."
    record = training.get("embedding_protection") or {}
    protection = record.get("method")
    if protection is None:
        return f"No training record says how the embedding was treated{moved}."
    partial_isolation = protection == "isolation" and not (is_number(record.get("weight")) and record["weight"] >= 1)
    if protection == "none" or partial_isolation:  # Adam undoes a scaled-down gradient when nothing else trains it
        return (
            f"The embedding was left unprotected while the heads trained{moved}: similarity quality may be below "
            "the base model's."
        )
    return f"The heads trained with the embedding protected ({protection}){moved}."


# ---------------------------------------------------------------------------------------------- published records

# Keys of config.json (the encoder's `backbone_config` too), tokenizer_config.json and trainer_state.json whose value
# is where a model, tokenizer or checkpoint lay when it was saved.
_PATH_KEYS = ("_name_or_path", "name_or_path", "best_model_checkpoint")
_PATH_RECORDS = (MODEL_COMMIT_FILE, "tokenizer_config.json", "trainer_state.json")


def _is_local_path(value: Any) -> bool:
    return isinstance(value, str) and os.path.isabs(os.path.expanduser(value))


def _published_path(value: Any) -> Any:
    """A local path as a published record names it: the Hub id of the default backbone's offline copy, else
    `./<its last part>` (relative, so `hub_dataset_id` never takes it for a Hub id); anything else unchanged."""
    if not _is_local_path(value):
        return value
    return _base_model_id(value) or f"./{Path(value).name}"


def _published_paths(value: Any, keys: tuple[str, ...] | None = None) -> Any:
    """`value` (read from JSON) with its local paths replaced (`_published_path`): in every string, or with `keys`
    only in the values of those keys (labels and texts elsewhere may start with '/')."""
    if isinstance(value, dict):
        return {
            key: _published_path(item) if keys and key in keys else _published_paths(item, keys)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_published_paths(item, keys) for item in value]
    return value if keys else _published_path(value)


def base_model_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """License and language of the base model the records of `folder` name, from its own card when it is available
    locally (`remove_local_paths` leaves the records unable to find it)."""
    config, _, training, _ = _read_records(Path(folder))
    return _base_model_metadata(_base_model(config, training))


def _published_dataset(dataset: Any) -> Any:
    """Data not on the Hub as a published record names it: `./<the name the card shows>` (the local files of a task
    become their folder's name); a Hub id, or a dataset given in memory, unchanged."""
    if isinstance(dataset, str) and not hub_dataset_id(dataset) and not dataset.startswith("<in-memory"):
        return f"./{_dataset_label(dataset)}"
    return dataset


def remove_local_paths(folder: str | os.PathLike) -> None:
    """Rewrite the records of `folder`, a copy about to be published (never a model's own folder), so that none
    names a place on this machine: the base model and every other path become the default backbone's Hub id or
    `./<name>` (`_published_path`), each task's data `_published_dataset`; its labels and example texts are left as
    they are. A rewritten file is a new file: where it was hard-linked to the model folder, that one is unchanged."""
    folder = Path(folder)
    records = {name: _read_json(folder / name) for name in (*_PATH_RECORDS, "training_config.json")}
    published = {name: _published_paths(records[name], _PATH_KEYS) for name in _PATH_RECORDS}
    training = records["training_config.json"]
    if isinstance(training, dict):
        # Every string outside the tasks; in them only the data (labels and example texts may start with '/').
        training = {key: value if key == "tasks" else _published_paths(value) for key, value in training.items()}
        tasks = training.get("tasks") or {}
        training["tasks"] = {
            name: {**info, "dataset": _published_dataset(info.get("dataset"))} for name, info in tasks.items()
        }
        published["training_config.json"] = training
    for name, value in published.items():
        if value != records[name]:
            (folder / name).unlink()
            (folder / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def write_model_card(output_dir: str | os.PathLike, repo_id: str | None = None, **overrides) -> Path:
    """Write `README.md` (the model card) into a saved model folder and return its path.

    Args:
        output_dir: the saved model (a `save_pretrained` / `train.py` output folder).
        repo_id: the Hub repo id it is published as (shown in the usage example); `None` before publishing.
        overrides: see [`build_model_card`] (`license`, `language`, `base_model`, `datasets`, `tags`, `figure`, ...).
    """
    card = build_model_card(output_dir, repo_id=repo_id, **overrides)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


__all__ = ["base_model_metadata", "build_model_card", "hub_dataset_id", "remove_local_paths", "write_model_card"]
