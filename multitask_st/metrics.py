"""Per-task evaluation metrics through `evaluate`, from metric modules that ship with this package (no network).

Each task type has a primary metric; the combined score (the mean of the primary metrics) is what
`metric_for_best_model="combined_score"` selects on. Metric keys keep their structure: `<task>/<metric>` (the
Trainer adds `eval_`), which a task name can never make ambiguous since names cannot contain `/`.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_mtl import labelled_mask, text_fingerprints

METRICS_DIR = Path(__file__).resolve().parent / "metric_scripts"
SEPARATOR = "/"

# The metric of each task type that enters the combined score (and is printed first).
PRIMARY_METRIC = {
    "classification": "macro_f1",
    "multi_label_classification": "micro_f1",
    "token_classification": "f1",
    "regression": "spearman",
    "similarity": "spearman",
    "pair_classification": "macro_f1",
    "contrastive": "mrr",
}


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


def _labelled(references: np.ndarray) -> np.ndarray:
    return labelled_mask(torch.from_numpy(np.array(references))).numpy()


def task_metrics(task: dict[str, Any], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Metrics of one task from its predictions and references, skipping unlabelled items (`labelled_mask`).

    Args:
        task: the task's config entry (`name`, `type`, `labels`, `threshold`).
        predictions: classification / pair classification `(n, num_labels)` logits; token classification `(n, seq)`
            predicted tag ids; multi-label `(n, num_labels)` logits; regression `(n, num_outputs)` values;
            similarity `(n,)` cosines; contrastive `(n, 2, dim)` anchor and positive embeddings.
        references: ids or values as in `MultiTaskModel.forward`'s `labels`; contrastive `(n, 2)` anchor and
            positive text ids (`MultiTaskTrainer.prediction_step` gives them).
    """
    task_type = task["type"]
    references = np.asarray(references)
    if task_type in ("classification", "pair_classification"):
        return _classification(task, np.asarray(predictions), references)
    if task_type == "token_classification":
        return _token_classification(task, np.asarray(predictions), references)
    if task_type == "multi_label_classification":
        return _multi_label(task, np.asarray(predictions, dtype=np.float64), references.astype(np.float64))
    if task_type in ("regression", "similarity"):
        return _correlations(task, np.asarray(predictions, dtype=np.float64), references.astype(np.float64))
    if task_type == "contrastive":
        return _retrieval(np.asarray(predictions, dtype=np.float32), references)
    raise ValueError(f"task '{task['name']}': unknown task type '{task_type}'")


def _classification(task: dict[str, Any], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    keep = _labelled(references)
    if not keep.any():
        return {}
    predicted = predictions[keep].argmax(-1).tolist()
    gold = references[keep].astype(int).tolist()
    return {
        "accuracy": load_metric("mtl_accuracy").compute(predictions=predicted, references=gold)["accuracy"],
        "macro_f1": load_metric("mtl_f1").compute(
            predictions=predicted, references=gold, average="macro", labels=list(range(len(task["labels"])))
        )["f1"],
    }


def _token_classification(task: dict[str, Any], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    labels = task["labels"]
    width = min(predictions.shape[1], references.shape[1])
    predicted_tags, gold_tags = [], []
    for row_predictions, row_references in zip(predictions[:, :width], references[:, :width]):
        keep = _labelled(row_references)  # one position per word: metrics are per word, not per sub-token
        if not keep.any():
            continue
        predicted_tags.append([labels[int(i)] for i in row_predictions[keep]])
        gold_tags.append([labels[int(i)] for i in row_references[keep]])
    if not gold_tags:
        return {}
    return load_metric("mtl_seqeval").compute(predictions=predicted_tags, references=gold_tags)


def _multi_label(task: dict[str, Any], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    keep = _labelled(references).all(-1)
    if not keep.any():
        return {}
    probabilities = 1.0 / (1.0 + np.exp(-predictions[keep]))
    predicted = (probabilities >= task.get("threshold", 0.5)).astype(int).tolist()
    gold = references[keep].astype(int).tolist()
    f1 = load_metric("mtl_f1", "multilabel")
    return {
        "micro_f1": f1.compute(predictions=predicted, references=gold, average="micro")["f1"],
        "macro_f1": f1.compute(predictions=predicted, references=gold, average="macro")["f1"],
    }


def _correlations(task: dict[str, Any], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman per output (regression) or of the cosine against the gold score (similarity)."""
    predictions = predictions.reshape(len(references), -1)
    references = references.reshape(len(references), -1)
    names = task["labels"] or ["score"]
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


def retrieval_text_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The text ids a contrastive task's references hold (`_retrieval`): equal for equal token sequences, and
    non-negative, so that no id can read as `IGNORE_INDEX`."""
    return text_fingerprints(input_ids, attention_mask) & (2**62 - 1)


def _retrieval(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Recall@1 and MRR over the split, as an information-retrieval evaluation: each distinct anchor text is a query,
    ranked against every distinct positive text of the split; its relevant passages are the positives of every row
    with that anchor. A passage holding the query's own text is left out, as the training loss leaves it out of the
    negatives.

    Args:
        predictions: `(n, 2, dim)` each row's anchor and positive embeddings.
        references: `(n, 2)` each row's anchor and positive text ids (`IGNORE_INDEX` for rows without the task).
    """
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


def combined_score(per_task: dict[str, dict[str, float]], tasks: list[dict[str, Any]]) -> float:
    """Mean of each task's primary metric (tasks without a finite value are left out)."""
    values = []
    for task in tasks:
        value = per_task.get(task["name"], {}).get(PRIMARY_METRIC[task["type"]])
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
