"""Per-task evaluation metrics through `evaluate`, from metric modules that ship with this package (no network).

Which metrics score a task, and which one is its primary metric (the mean of the primary metrics is the combined
score, what `metric_for_best_model="combined_score"` selects on), is the task type's (`tasks_mtl.Task.metrics`,
`.primary_metric`); this module loads the metric modules and assembles the Trainer's `compute_metrics`. Metric keys
keep their structure: `<task>/<metric>` (the Trainer adds `eval_`), which a task name can never make ambiguous since
names cannot contain `/`.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tasks_mtl import make_task, retrieval_text_ids  # noqa: F401  (retrieval_text_ids: the references' text ids)

METRICS_DIR = Path(__file__).resolve().parent / "metric_scripts"
SEPARATOR = "/"


@cache
def load_metric(name: str, config_name: str | None = None):
    """Load one of the bundled metric modules (`mtl_accuracy`, `mtl_f1`, `mtl_seqeval`, `mtl_correlation`,
    `mtl_retrieval`). `evaluate.load` on a local folder copies the script into its module cache and never contacts
    the Hub."""
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"unknown metric '{name}': no {path}/{name}.py")
    return evaluate.load(str(path), config_name) if config_name else evaluate.load(str(path))


def task_metrics(task: dict[str, Any], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Metrics of one task (its config entry) from its predictions and references, skipping unlabelled items.

    Args:
        task: the task's config entry (`name`, `type`, `labels`, ...).
        predictions: what `Task.eval_predictions` gives, concatenated over the split.
        references: ids or values as in `MultiTaskModel.forward`'s `labels` (`Task.eval_references`).
    """
    return make_task(task).metrics(np.asarray(predictions), np.asarray(references), load_metric)


def combined_score(per_task: dict[str, dict[str, float]], tasks: list[dict[str, Any]]) -> float:
    """Mean of each task's primary metric (tasks without a finite value are left out)."""
    values = []
    for task in tasks:
        value = per_task.get(task["name"], {}).get(make_task(task).primary_metric)
        if value is not None and math.isfinite(value):
            values.append(value)
    return float(np.mean(values)) if values else float("nan")


def metric_key(task: str, metric: str) -> str:
    return f"{task}{SEPARATOR}{metric}"


def build_compute_metrics(tasks: list[dict[str, Any]]):
    """A `compute_metrics` for `Trainer`: predictions and label_ids are tuples in the order of `tasks`.

    Returns keys `<task>/<metric>` (the Trainer prefixes them with `eval_`) plus `combined_score`.
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
        flat = {metric_key(name, key): value for name, scores in per_task.items() for key, value in scores.items()}
        flat["combined_score"] = combined_score(per_task, tasks)
        return flat

    return compute_metrics


def nest_metrics(metrics: dict[str, float], prefix: str = "eval") -> dict[str, dict[str, float]]:
    """`{"eval_topic/accuracy": x, ...}` as `{"topic": {"accuracy": x}, ...}` (keys without a `/` are left out)."""
    result: dict[str, dict[str, float]] = {}
    start = f"{prefix}_"
    for key, value in metrics.items():
        if key.startswith(start) and SEPARATOR in key:
            owner, metric = key[len(start) :].split(SEPARATOR, 1)
            result.setdefault(owner, {})[metric] = value
    return result
