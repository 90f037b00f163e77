"""What a training run records and reports: the hardware it ran on, the options that differ from their defaults,
`training_config.json`, the evaluation of every split (`metrics.json`), and one-line predictions for the report.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import MISSING, asdict, fields
from typing import Any

import torch
from transformers import TrainingArguments

from .metrics import nest_metrics


def describe_hardware(training_args: TrainingArguments) -> dict[str, Any]:
    """Where and how the run trained: device, processes, precision and threads (recorded and shown in the card)."""
    if torch.cuda.is_available() and not training_args.use_cpu:
        device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    precision = "bf16 mixed" if training_args.bf16 else "fp16 mixed" if training_args.fp16 else "fp32"
    return {
        "device": device,
        "processes": training_args.world_size,
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "system": platform.system(),
    }


def hardware_line(hardware: dict[str, Any]) -> str:
    return (
        f"{hardware['device']}, {hardware['processes']} process(es), {hardware['precision']}, "
        f"{hardware['torch_threads']} torch thread(s), torch {hardware['torch']}, {hardware['system']}"
    )


# Recorded whatever their value: what a reader of the card needs to repeat the run, whose defaults here (train.py's
# recipe) are not TrainingArguments'.
ALWAYS_RECORDED = (
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "seed",
)


def non_default_hyperparameters(training_args: TrainingArguments, *extra) -> dict[str, Any]:
    """The TrainingArguments, model, data and multi-task options that differ from their defaults, and those of
    `ALWAYS_RECORDED`."""
    defaults = {f.name: f.default for f in fields(type(training_args)) if f.init}
    skip = {"output_dir", "logging_dir", "hub_token", "report_to", "run_name", "accelerator_config", "disable_tqdm"}
    result = {}
    for key, value in training_args.to_dict().items():
        if key in ALWAYS_RECORDED:
            result[key] = value
            continue
        if key in skip or key not in defaults:
            continue
        default = defaults[key]
        if hasattr(default, "value"):
            default = default.value
        if value in (None, False, [], {}, "") and default in (None, False, MISSING, "", []):
            continue  # unset either way (the dataclass default was None, empty or a factory)
        if value != default and not callable(default):
            result[key] = value
    for arguments in extra:  # model / data / multi-task options: only those set to something else than default
        option_defaults = {
            f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(arguments)
            if f.default is not MISSING or f.default_factory is not MISSING
        }
        for key, value in asdict(arguments).items():
            if key != "tasks" and (key not in option_defaults or value != option_defaults[key]):
                result[key] = value
    return json.loads(json.dumps(result, default=str))


def training_record(specs, data, base_model: str, hyperparameters: dict, hardware: dict, runtime: float) -> dict:
    """What `training_config.json` holds: the base model, each task's data (with its size and columns), the
    non-default options, the hardware and the runtime."""
    tasks = {}
    for spec in specs:
        train_rows = data.source_sizes[next(i for i, names in enumerate(data.source_tasks) if spec.name in names)]
        tasks[spec.name] = {
            "type": spec.type,
            "dataset": spec.describe_dataset(),
            "dataset_config": spec.dataset_config,
            "hub_dataset": spec.hub_dataset,
            "train_split": spec.train_split,
            "eval_split": spec.eval_split,
            "test_split": spec.test_split,
            "num_train_rows": train_rows,
            "num_train_examples": data.num_train_examples.get(spec.name, 0),
            "labels": spec.labels,
            "input_columns": spec.input_columns,
            "label_column": spec.label_source,
            "row_filter": spec.row_filter,
            "examples": [
                list(example) if isinstance(example, tuple) else example for example in data.examples.get(spec.name, [])
            ],
        }
    return {
        "base_model": base_model,
        "tasks": tasks,
        "hyperparameters": hyperparameters,
        "hardware": hardware_line(hardware),
        "hardware_details": hardware,
        "train_runtime_s": round(float(runtime), 2),
    }


def evaluate_splits(trainer, data) -> dict[str, Any]:
    """`metrics.json`'s content: per split, `{task: {metric: value}}`, the combined scores, and the embedding's
    drift (`embedding`)."""
    metrics: dict[str, Any] = {}
    for key, dataset in (("eval", data.eval), ("test", data.test)):
        if dataset is None:
            continue
        scores = trainer.evaluate(dataset, metric_key_prefix=key)
        nested = nest_metrics(scores, key)
        if "embedding" in nested:
            metrics.setdefault("embedding", {})[key] = nested.pop("embedding")
        metrics[key] = nested
        metrics["combined_score" if key == "eval" else "test_combined_score"] = scores.get(f"{key}_combined_score")
    return metrics


def format_prediction(prediction: dict[str, Any], config: Any) -> str:
    """One line per input of `model.predict` output, for the end-of-run report (each task's short form is its
    type's: `Task.format_prediction`)."""
    return "; ".join(config.task(name).format_prediction(value) for name, value in prediction.items())
