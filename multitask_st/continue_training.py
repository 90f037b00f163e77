"""Continue training a saved model on some tasks only, adding heads for tasks it does not have
(docs/TRAINING_CHOICES.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import set_seed

from modeling_mtl import MultiTaskModel
from validation_mtl import InputError

from .arguments import MultiTaskTrainingArguments
from .data import build_datasets, parse_task_specs
from .metrics import nest_metrics
from .saving import write_json
from .trainer import MultiTaskTrainer, apply_freezing


def _rows_of(data, train_tasks: list[str]) -> tuple[list[int], list[int]]:
    """The training rows of the sources of `train_tasks` (sources are concatenated in order in `data.train`), and
    those sources' sizes; a source that also labels another task is an error."""
    offsets = [sum(data.source_sizes[:index]) for index in range(len(data.source_sizes))]
    indices, sizes = [], []
    for source, tasks in enumerate(data.source_tasks):
        if set(tasks) & set(train_tasks):
            if not set(tasks) <= set(train_tasks):
                raise InputError(f"source of {tasks} also labels tasks outside train_tasks {train_tasks}")
            indices.extend(range(offsets[source], offsets[source] + data.source_sizes[source]))
            sizes.append(data.source_sizes[source])
    return indices, sizes


def continue_training(
    base_model_dir: str | os.PathLike,
    task_dicts: list[dict[str, Any]],
    train_tasks: list[str],
    output_dir: str | os.PathLike,
    training_arguments: dict[str, Any],
    freeze_old_heads: bool = False,
    freeze_backbone: bool = False,
    max_seq_length: int | None = None,
    head_learning_rate: float | None = None,
    evaluate_before: bool = True,
    embedding_protection: str | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Continue training a saved `MultiTaskModel` on some tasks only, adding heads for tasks it does not have.

    Args:
        base_model_dir: a folder written by `train.py` / `save_pretrained`.
        task_dicts: data specs (`multitask_st.data.TaskDataSpec` dicts) for every task to score: the model's old
            tasks (their labels are taken from the model, so ids keep their meaning) and the new ones.
        train_tasks: the tasks whose training rows are used (each must be the only task of its data source).
        output_dir: where the continued model and `continue_metrics.json` go.
        training_arguments: `MultiTaskTrainingArguments` keywords (output_dir is set here).
        freeze_old_heads: keep every head the base model already had fixed (`apply_freezing(freeze_heads=...)`).
        freeze_backbone: keep the encoder fixed as well.
        evaluate_before: also score the test splits before training (the new heads are then untrained).
        head_learning_rate / embedding_protection: the `MultiTaskTrainingArguments` options, when given here
            (the reference of the protection is the base model's embedding).
        callbacks: extra `TrainerCallback`s.

    Returns: `{"before": {task: metrics}, "after": ..., "train_runtime_s", "frozen_tensors", ...}`.
    """
    output_dir = Path(output_dir)
    seed = training_arguments.get("seed", 42)
    base = MultiTaskModel.from_pretrained(str(base_model_dir))
    old_tasks = list(base.config.task_names)
    task_dicts = [dict(task) for task in task_dicts]
    for task in task_dicts:
        if task["name"] in old_tasks:
            task["labels"] = list(base.config.get_task(task["name"])["labels"])
    specs = parse_task_specs(task_dicts)
    data = build_datasets(specs, base.tokenizer, max_seq_length or base.config.max_seq_length, seed=seed, do_eval=False)
    unknown = sorted(set(train_tasks) - {spec.name for spec in specs})
    if unknown:
        raise InputError(f"train_tasks {unknown} have no data spec")
    indices, sizes = _rows_of(data, train_tasks)

    set_seed(seed)
    new_tasks = [spec.model_task() for spec in specs if spec.name not in old_tasks]
    model = base.add_tasks(new_tasks) if new_tasks else base
    frozen = apply_freezing(model, freeze_backbone=freeze_backbone, freeze_heads=old_tasks if freeze_old_heads else [])
    arguments = {**training_arguments, "output_dir": str(output_dir)}
    for name, value in (("head_learning_rate", head_learning_rate), ("embedding_protection", embedding_protection)):
        if value is not None:
            arguments[name] = value
    trainer = MultiTaskTrainer(
        model=model,
        args=MultiTaskTrainingArguments(**arguments),
        train_dataset=data.train.select(indices),
        callbacks=callbacks,
        source_sizes=sizes,
        train_tasks=train_tasks,  # `auto` looks at the tasks that train now, not at every task the model has
    )
    result: dict[str, Any] = {
        "old_tasks": old_tasks,
        "new_tasks": [t["name"] for t in new_tasks],
        "train_source_sizes": sizes,
    }
    if evaluate_before and data.test is not None:
        result["before"] = nest_metrics(trainer.evaluate(data.test, metric_key_prefix="test"), "test")
    train_result = trainer.train()
    result["train_runtime_s"] = round(float(train_result.metrics["train_runtime"]), 2)
    if data.test is not None:
        result["after"] = nest_metrics(trainer.evaluate(data.test, metric_key_prefix="test"), "test")
    result["frozen_tensors"] = len(frozen)
    trainer.save_model(str(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "continue_metrics.json", result)
    return result
