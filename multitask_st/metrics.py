"""Per-task evaluation metrics through `evaluate`, from metric modules that ship with this package (no network).

Each task type has a primary metric; the combined score (the mean of the primary metrics) is what
`metric_for_best_model="combined_score"` selects on.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
IGNORE_INDEX = -100

# The metric of each task type that enters the combined score (and is printed first).
PRIMARY_METRIC = {
    "classification": "macro_f1",
    "multi_label_classification": "micro_f1",
    "token_classification": "f1",
    "regression": "spearman",
}


@cache
def load_metric(name: str, config_name: str | None = None):
    """Load one of the bundled metric modules (`mtl_accuracy`, `mtl_f1`, `mtl_seqeval`, `mtl_correlation`).

    `evaluate.load` on a local folder copies the script into its module cache and never contacts the Hub.
    """
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"unknown metric '{name}': no {path}/{name}.py")
    return evaluate.load(str(path), config_name) if config_name else evaluate.load(str(path))


def task_metrics(task: dict[str, Any], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Metrics of one task from its predictions and references, skipping unlabelled items.

    Args:
        task: the task's config entry (`name`, `type`, `labels`, `threshold`).
        predictions: classification `(n, num_labels)` logits; token classification `(n, seq)` predicted tag
            ids; multi-label `(n, num_labels)` logits; regression `(n, num_outputs)` values.
        references: classification `(n,)` ids (-100 = unlabelled); token `(n, seq)` ids (-100 = not the first
            sub-token of a word, padding, or unlabelled); multi-label / regression floats (NaN = unlabelled).
    """
    task_type = task["type"]
    labels = task["labels"]
    if task_type == "classification":
        keep = references != IGNORE_INDEX
        predicted = np.asarray(predictions)[keep].argmax(-1).tolist()
        gold = np.asarray(references)[keep].astype(int).tolist()
        if not gold:
            return {}
        return {
            "accuracy": load_metric("mtl_accuracy").compute(predictions=predicted, references=gold)["accuracy"],
            "macro_f1": load_metric("mtl_f1").compute(
                predictions=predicted, references=gold, average="macro", labels=list(range(len(labels)))
            )["f1"],
        }
    if task_type == "token_classification":
        predictions, references = np.asarray(predictions), np.asarray(references)
        width = min(predictions.shape[1], references.shape[1])
        predicted_tags, gold_tags = [], []
        for row_predictions, row_references in zip(predictions[:, :width], references[:, :width]):
            keep = row_references != IGNORE_INDEX  # one position per word: metrics are per word, not per sub-token
            if not keep.any():
                continue
            predicted_tags.append([labels[int(i)] for i in row_predictions[keep]])
            gold_tags.append([labels[int(i)] for i in row_references[keep]])
        if not gold_tags:
            return {}
        return load_metric("mtl_seqeval").compute(predictions=predicted_tags, references=gold_tags)
    if task_type == "multi_label_classification":
        references = np.asarray(references, dtype=np.float64)
        keep = ~np.isnan(references).any(-1)
        if not keep.any():
            return {}
        probabilities = 1.0 / (1.0 + np.exp(-np.asarray(predictions, dtype=np.float64)[keep]))
        predicted = (probabilities >= task.get("threshold", 0.5)).astype(int).tolist()
        gold = references[keep].astype(int).tolist()
        f1 = load_metric("mtl_f1", "multilabel")
        return {
            "micro_f1": f1.compute(predictions=predicted, references=gold, average="micro")["f1"],
            "macro_f1": f1.compute(predictions=predicted, references=gold, average="macro")["f1"],
        }
    if task_type == "regression":
        predictions = np.asarray(predictions, dtype=np.float64).reshape(len(references), -1)
        references = np.asarray(references, dtype=np.float64).reshape(len(references), -1)
        results: dict[str, float] = {}
        for column, name in enumerate(labels):
            keep = ~np.isnan(references[:, column])
            if not keep.any():
                continue
            scores = load_metric("mtl_correlation").compute(
                predictions=predictions[keep, column].tolist(), references=references[keep, column].tolist()
            )
            suffix = "" if len(labels) == 1 else f"_{name}"
            results.update({f"{key}{suffix}": value for key, value in scores.items()})
        if len(labels) > 1 and results:
            results["spearman"] = float(np.nanmean([v for k, v in results.items() if k.startswith("spearman_")]))
        return results
    raise ValueError(f"task '{task['name']}': unknown task type '{task_type}'")


def combined_score(per_task: dict[str, dict[str, float]], tasks: list[dict[str, Any]]) -> float:
    """Mean of each task's primary metric (tasks without a finite value are left out)."""
    values = []
    for task in tasks:
        value = per_task.get(task["name"], {}).get(PRIMARY_METRIC[task["type"]])
        if value is not None and math.isfinite(value):
            values.append(value)
    return float(np.mean(values)) if values else float("nan")


def build_compute_metrics(tasks: list[dict[str, Any]]):
    """A `compute_metrics` for `Trainer`: predictions and label_ids are tuples in the order of `tasks`.

    Returns flat keys `<task>_<metric>` (the Trainer prefixes them with `eval_`) plus `combined_score`.
    """

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions, references = eval_prediction.predictions, eval_prediction.label_ids
        if not isinstance(predictions, (tuple, list)):
            predictions = (predictions,)
        if not isinstance(references, (tuple, list)):
            references = (references,)
        per_task = {
            task["name"]: task_metrics(task, prediction, reference)
            for task, prediction, reference in zip(tasks, predictions, references)
        }
        flat = {f"{name}_{metric}": value for name, scores in per_task.items() for metric, value in scores.items()}
        flat["combined_score"] = combined_score(per_task, tasks)
        return flat

    return compute_metrics


def split_metrics(
    metrics: dict[str, float], task_names: list[str], prefix: str = "eval"
) -> dict[str, dict[str, float]]:
    """Turn Trainer metrics (`eval_<task>_<metric>`) back into `{task: {metric: value}}`."""
    result: dict[str, dict[str, float]] = {name: {} for name in task_names}
    for key, value in metrics.items():
        # The longest matching task name wins, so `eval_ner_fine_f1` belongs to `ner_fine`, not `ner`.
        owners = [name for name in task_names if key.startswith(f"{prefix}_{name}_")]
        if owners:
            owner = max(owners, key=len)
            result[owner][key[len(prefix) + len(owner) + 2 :]] = value
    return result
