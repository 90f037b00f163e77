"""The library pieces of a training run, used by `train.py` and by code that trains programmatically: the output
folder (refuse to clobber another model, atomic final save, strict-JSON metrics, training record), resuming from the
last *complete* checkpoint, LoRA on the shared encoder, and continuing to train a saved model on new tasks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from configuration_mtl import HEADLESS_TASK_TYPES, SEQUENCE_TASK_TYPES
from modeling_mtl import MultiTaskModel

logger = logging.get_logger(__name__)

# The files a saved model consists of; `config.json` is written last, so a folder holding a `config.json` holds a
# complete model (see `commit_model_folder`).
MODEL_COMMIT_FILE = "config.json"
STAGING_DIR = ".final-model-staging"
LORA_CONFIG_FILE = "multitask_config.json"  # the MultiTaskConfig beside a LoRA adapter (adapter_config.json is PEFT's)
PROTECTION_FILE = "embedding_protection.json"  # in every checkpoint: the protection the run trained with


class TrainingError(RuntimeError):
    """A training run that cannot go on: the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ heads

# The settings `default_head` reads (train.py's `ModelArguments` fields, whose defaults are the recipe's).
HEAD_SETTINGS = ("head_type", "token_head_type", "head_pooling", "head_layers", "token_head_layers")


def default_head(
    task_type: str, *, head_type: str, token_head_type: str, head_pooling: str, head_layers: int, token_head_layers: int
) -> dict[str, Any] | None:
    """The head a task gets when its spec sets none, from train.py's `--head_*` settings: `None` for the types
    without a head of their own settings (`similarity`, `contrastive`) and for a plain linear head on the shared
    vector."""
    if task_type in HEADLESS_TASK_TYPES:
        return None
    token = task_type == "token_classification"
    kind = token_head_type if token else head_type
    head: dict[str, Any] = {"type": kind} if kind != "linear" else {}
    if head_pooling != "shared" and task_type in SEQUENCE_TASK_TYPES:
        head["pooling"] = head_pooling
    layers = token_head_layers if token else head_layers
    if layers and (token or head.get("pooling") == "attention"):
        head["layers"] = layers
    return head or None


# ---------------------------------------------------------------------------------------------- output folder


def check_output_dir(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that already holds a model (unless resuming or asked to overwrite)."""
    folder = Path(output_dir)
    if folder.is_file():
        raise TrainingError(f"output_dir {folder} is a file, not a folder")
    if resuming or overwrite or not (folder / MODEL_COMMIT_FILE).is_file():
        return
    raise TrainingError(
        f"output_dir {folder} already holds a model ({MODEL_COMMIT_FILE}): pass --overwrite_output_dir true to "
        "replace it, --resume_from_checkpoint to continue its run, or choose another --output_dir"
    )


def commit_model_folder(staging: Path, output_dir: Path) -> None:
    """Move a fully written model from `staging` into `output_dir`, so that a kill at any moment leaves either the
    old model, or no model (no `config.json`: loading fails with a clear error), never new config with old weights.

    The old `config.json` is removed first, every other file is moved in (each `os.replace` is atomic), and the new
    `config.json` comes last.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MODEL_COMMIT_FILE).unlink(missing_ok=True)
    for path in sorted(staging.iterdir()):
        if path.name != MODEL_COMMIT_FILE:
            target = output_dir / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
    os.replace(staging / MODEL_COMMIT_FILE, output_dir / MODEL_COMMIT_FILE)
    staging.rmdir()


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by `None`, so that `json.dumps(..., allow_nan=False)` holds."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return strict_json(value.item())
    return value


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(strict_json(value), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- checkpoints


def is_complete_checkpoint(folder: Path) -> bool:
    """The Trainer writes `trainer_state.json` last: a checkpoint whose state parses, beside weights, is complete."""
    state = folder / "trainer_state.json"
    if not state.is_file() or not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return False
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest `checkpoint-<step>` of `output_dir` that was completely written (a run killed while writing a
    checkpoint leaves a partial one behind: it is skipped with a warning)."""
    folder = Path(output_dir)
    candidates = sorted(
        (path for path in folder.glob("checkpoint-*") if path.is_dir() and path.name.split("-")[-1].isdigit()),
        key=lambda path: int(path.name.split("-")[-1]),
        reverse=True,
    )
    for path in candidates:
        if is_complete_checkpoint(path):
            return str(path)
        logger.warning(f"skipping {path}: an incompletely written checkpoint (the run was killed while saving it)")
    raise TrainingError(f"--resume_from_checkpoint true: no complete checkpoint in {folder}")


def check_resumable(
    checkpoint: str | os.PathLike,
    model: torch.nn.Module,
    loss_weighting: str,
    protection: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume a checkpoint trained with other tasks, labels, heads, loss weighting or embedding protection:
    its head weights would silently mean something else, or its optimizer state would not fit (the protection decides
    which parameters train). The message names every difference."""
    from .embedding import unwrap

    config_path = Path(checkpoint) / "config.json"
    if not config_path.is_file():
        config_path = Path(checkpoint) / LORA_CONFIG_FILE  # a LoRA checkpoint: the adapter and the model config
    if not config_path.is_file():
        raise TrainingError(f"cannot resume from {checkpoint}: it holds no config.json (not a checkpoint of a model)")
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    current_tasks = {task["name"]: task for task in unwrap(model).config.tasks}
    saved_tasks = {task["name"]: task for task in saved.get("tasks", [])}
    differences = []
    for name in sorted(set(saved_tasks) - set(current_tasks)):
        differences.append(f"task '{name}' is in the checkpoint but not in this run")
    for name in sorted(set(current_tasks) - set(saved_tasks)):
        differences.append(f"task '{name}' is in this run but not in the checkpoint")
    for name in sorted(set(saved_tasks) & set(current_tasks)):
        for key in sorted(set(saved_tasks[name]) | set(current_tasks[name])):
            before, now = saved_tasks[name].get(key), current_tasks[name].get(key)
            if before != now:
                differences.append(f"task '{name}': {key} was {before!r}, is {now!r}")
    weights = list(Path(checkpoint).glob("model*.safetensors"))
    if weights:
        from safetensors import safe_open

        with safe_open(str(weights[0]), framework="pt") as handle:
            had_weighting = any(key.startswith("loss_weighting.") for key in handle.keys())
        if had_weighting != (loss_weighting == "uncertainty"):
            was = "uncertainty" if had_weighting else "static"
            differences.append(f"loss_weighting was '{was}', is '{loss_weighting}'")
    saved_protection = Path(checkpoint) / PROTECTION_FILE
    if protection is not None and saved_protection.is_file():  # older checkpoints do not record it
        before = json.loads(saved_protection.read_text(encoding="utf-8"))
        if any(before[key] != protection[key] for key in ("method", "weight")):
            differences.append(
                f"embedding_protection was {before['method']} (weight {before['weight']}), "
                f"is {protection['method']} (weight {protection['weight']})"
            )
        elif before.get("frozen_encoder", protection["frozen_encoder"]) != protection["frozen_encoder"]:
            # older checkpoints do not record it
            was, now = (
                "frozen" if flag else "trained" for flag in (before["frozen_encoder"], protection["frozen_encoder"])
            )
            differences.append(f"the shared encoder was {was} (by the protection), is {now}")
    if differences:
        raise TrainingError(
            f"cannot resume from {checkpoint}: the run differs from the checkpoint ("
            + "; ".join(differences)
            + "). Resume with the same tasks and options, or start a new run in another output_dir."
        )


# ---------------------------------------------------------------------------------------------- LoRA


def apply_lora(
    model: MultiTaskModel,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.1,
    target_modules: list[str] | None = None,
) -> torch.nn.Module:
    """Wrap `model` so that only LoRA adapters of the shared encoder train (with every head, the pooling and the
    projection, which stay fully trainable: `modules_to_save`). Save with `save_lora_model`, which merges the
    adapters into the encoder so that the saved folder is a plain `MultiTaskModel`.

    Args:
        rank: LoRA rank r (> 0).
        alpha: scaling numerator (default `2 * rank`).
        dropout: dropout on the adapter input.
        target_modules: names of the encoder's linear layers to adapt (default: every linear layer of the
            attention and feed-forward blocks the backbone has, found by name).
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora_rank must be a positive int, got {rank!r}")
    targets = target_modules or _default_lora_targets(model)
    trainable_outside = [f"heads.{name}" for name in model.heads]
    trainable_outside += ["pooling"] if any(True for _ in model.pooling.parameters()) else []
    trainable_outside += ["projection"] if model.projection is not None else []
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        # A regex over full module names: only the encoder's layers (a head's `dense` must not match).
        target_modules=r"backbone\..*\.(" + "|".join(re.escape(name) for name in targets) + ")",
        modules_to_save=trainable_outside,
        bias="none",
    )
    return get_peft_model(model, config)


def save_lora_adapter(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Save a LoRA-wrapped model's adapters and trained heads (PEFT format) plus the `MultiTaskConfig` they belong
    to, so that `load_lora_model` can rebuild it from the base encoder."""
    model.save_pretrained(str(directory))
    model.get_base_model().config.to_json_file(str(Path(directory) / LORA_CONFIG_FILE))


def load_lora_model(directory: str | os.PathLike, base_model: str | None = None, merge: bool = False):
    """Rebuild a model saved by `save_lora_adapter`: the base encoder (`base_model`, default the one recorded in the
    adapter) with the saved tasks, then the adapters and heads. `merge=True` folds the adapters into the encoder and
    returns a plain `MultiTaskModel`."""
    from peft import PeftModel

    from configuration_mtl import MultiTaskConfig

    directory = Path(directory)
    config = MultiTaskConfig.from_json_file(str(directory / LORA_CONFIG_FILE))
    adapter = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    base = base_model or adapter.get("base_model_name_or_path") or config.name_or_path
    model = MultiTaskModel.from_backbone(
        base,
        tasks=config.tasks,
        pooling=config.pooling,
        normalize=config.normalize,
        max_seq_length=config.max_seq_length,
        projection_dim=config.projection_dim,
        head_dropout=config.head_dropout,
    )
    wrapped = PeftModel.from_pretrained(model, str(directory))
    return wrapped.merge_and_unload() if merge else wrapped


def _default_lora_targets(model: MultiTaskModel) -> list[str]:
    names = {
        name.split(".")[-1] for name, module in model.backbone.named_modules() if isinstance(module, torch.nn.Linear)
    }
    if not names:
        raise ValueError("the backbone has no nn.Linear layers to put LoRA adapters on; give lora_target_modules")
    return sorted(names)


# ---------------------------------------------------------------------------------------------- run records


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
    defaults = {f.name: f.default for f in fields(TrainingArguments) if f.init}
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
    from .metrics import nest_metrics

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


def save_run(trainer, output_dir: str | os.PathLike, metrics: dict, record: dict, lora: bool = False) -> Path:
    """Write the trained model, `metrics.json`, `training_config.json`, the trainer state and the model card into a
    staging folder, then commit it into `output_dir` (`commit_model_folder`: config.json last). With LoRA, the
    adapters (and heads) go to `lora_adapter/` and the saved model is the merged one. Every process must call this;
    only the main one writes."""
    output_dir = Path(output_dir)
    staging = output_dir / STAGING_DIR
    main = trainer.is_world_process_zero()
    if main and staging.exists():
        shutil.rmtree(staging)
    if lora:
        if main:
            save_lora_adapter(trainer.model, staging / "lora_adapter")
        trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    trainer.save_model(str(staging))
    if main:
        from .model_card import write_model_card

        write_json(staging / "metrics.json", metrics)
        write_json(staging / "training_config.json", record)
        if (output_dir / "trainer_state.json").is_file():
            shutil.copy(output_dir / "trainer_state.json", staging / "trainer_state.json")
        write_model_card(staging, name=output_dir.resolve().name)
        commit_model_folder(staging, output_dir)
    return output_dir


def format_prediction(prediction: dict[str, Any]) -> str:
    """One line per input of `model.predict` output, for the end-of-run report."""
    parts = []
    for task, value in prediction.items():
        if "label" in value:
            parts.append(f"{task}={value['label']} ({value['score']:.2f})")
        elif "entities" in value:
            entities = ", ".join(f"{e['text']}:{e['entity']}" for e in value["entities"]) or "-"
            parts.append(f"{task}=[{entities}]")
        elif "labels" in value:
            parts.append(f"{task}={value['labels']}")
        elif "value" in value:
            parts.append(f"{task}={value['value']:.3f}")
        elif "cosine" in value:
            parts.append(f"{task}=cos {value['cosine']:.3f}")
        else:
            parts.append(f"{task}={value}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- continuing


def _rows_of(data, train_tasks: list[str]) -> tuple[list[int], list[int]]:
    """The training rows of the sources of `train_tasks` (sources are concatenated in order in `data.train`), and
    those sources' sizes; a source that also labels another task is an error."""
    offsets = [sum(data.source_sizes[:index]) for index in range(len(data.source_sizes))]
    indices, sizes = [], []
    for source, tasks in enumerate(data.source_tasks):
        if set(tasks) & set(train_tasks):
            if not set(tasks) <= set(train_tasks):
                raise ValueError(f"source of {tasks} also labels tasks outside train_tasks {train_tasks}")
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
    embedding_protection: str = "auto",
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Continue training a saved `MultiTaskModel` on some tasks only, adding heads for tasks it does not have.

    Args:
        base_model_dir: a folder written by `train.py` / `save_pretrained`.
        task_dicts: data specs (`multitask_st.data.TaskDataSpec` dicts) for every task to score: the model's old
            tasks (their labels are taken from the model, so ids keep their meaning) and the new ones.
        train_tasks: the tasks whose training rows are used (each must be the only task of its data source).
        output_dir: where the continued model and `continue_metrics.json` go.
        training_arguments: `transformers.TrainingArguments` keywords (output_dir is set here).
        freeze_old_heads: keep every head the base model already had fixed (`apply_freezing(freeze_heads=...)`).
        freeze_backbone: keep the encoder fixed as well.
        evaluate_before: also score the test splits before training (the new heads are then untrained).
        embedding_protection: see `MultiTaskTrainer` (the reference is the base model's embedding).
        callbacks: extra `TrainerCallback`s.

    Returns: `{"before": {task: metrics}, "after": ..., "train_runtime_s", "frozen_tensors", ...}`.
    """
    from transformers import set_seed

    from .data import build_datasets, parse_task_specs
    from .metrics import nest_metrics
    from .trainer import MultiTaskTrainer, apply_freezing

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
        raise ValueError(f"train_tasks {unknown} have no data spec")
    indices, sizes = _rows_of(data, train_tasks)

    set_seed(seed)
    new_tasks = [spec.model_task() for spec in specs if spec.name not in old_tasks]
    model = base.add_tasks(new_tasks) if new_tasks else base
    frozen = apply_freezing(model, freeze_backbone=freeze_backbone, freeze_heads=old_tasks if freeze_old_heads else [])
    trainer = MultiTaskTrainer(
        model=model,
        args=TrainingArguments(**{**training_arguments, "output_dir": str(output_dir)}),
        train_dataset=data.train.select(indices),
        callbacks=callbacks,
        source_sizes=sizes,
        head_learning_rate=head_learning_rate,
        embedding_protection=embedding_protection,
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
