"""Train a multi-task sentence transformer with the `transformers.Trainer`.

    python train.py                                  # the embedded default job (all-MiniLM-L6-v2, CPU, minutes)
    python train.py config.yaml [--flag value ...]   # a YAML/JSON config file; flags after it override it
    python train.py --tasks tasks.json --output_dir out --num_train_epochs 3 ...
    accelerate launch --num_processes 2 train.py config.yaml   # same arguments, distributed

Every `TrainingArguments` flag works (see `python train.py --help`). Tasks are a JSON/YAML list of dicts (see
`multitask_st.data.TaskDataSpec`), e.g.
    [{"name": "sentiment", "type": "classification", "dataset": "data/sst2", "text_column": "sentence",
      "label_column": "label", "labels": ["negative", "positive"]},
     {"name": "ner", "type": "token_classification", "dataset": "data/wikiann-en"}]
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, EarlyStoppingCallback, HfArgumentParser, TrainingArguments, set_seed
from transformers.utils import logging

logger = logging.get_logger("train")

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "multitask_st" / "data"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Encoder to start from: Hub id or folder (default: the bundled all-MiniLM-L6-v2)."},
    )
    pooling: str | None = field(default=None, metadata={"help": "Pooling mode (default: the checkpoint's, or mean)."})
    projection_dim: int | None = field(default=None, metadata={"help": "Project the embedding to this size."})
    normalize: bool | None = field(default=None, metadata={"help": "L2-normalise embeddings (default: checkpoint's)."})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Truncation length in tokens (default: the checkpoint's, at most 512)."}
    )
    head_type: str = field(default="linear", metadata={"help": "Default head for tasks that set none: linear or mlp."})
    head_dropout: float = field(default=0.1, metadata={"help": "Dropout before each head."})


@dataclass
class DataArguments:
    tasks: str | None = field(
        default=None,
        metadata={"help": "Task list: JSON string, or path to a JSON/YAML file (see multitask_st.data.TaskDataSpec)."},
    )
    label_all_subtokens: bool = field(
        default=False, metadata={"help": "Token tasks: label every sub-token in training, not only the first."}
    )
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for `datasets`."})


@dataclass
class MultiTaskArguments:
    task_sampling: str = field(
        default="temperature",
        metadata={
            "help": "How batches are drawn from datasets of different sizes: temperature (p ~ n^(1/T)), "
            "proportional, uniform or round_robin."
        },
    )
    sampling_temperature: float = field(default=2.0, metadata={"help": "T of temperature sampling."})
    loss_weighting: str = field(
        default="static",
        metadata={"help": "static (each task's loss_weight) or uncertainty (learned, Kendall et al. 2018)."},
    )
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of heads/pooling/projection (default: learning_rate)."}
    )
    layerwise_lr_decay: float | None = field(
        default=None, metadata={"help": "Per-layer learning-rate decay factor down the encoder (e.g. 0.9)."}
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the whole encoder (train heads only)."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Freeze the encoder's embeddings."})
    freeze_layers: int = field(default=0, metadata={"help": "Freeze the embeddings and the lowest N layers."})
    freeze_heads: list[str] | None = field(default=None, metadata={"help": "Task heads to keep frozen."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement of the best metric."}
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "How much the best metric must improve to count as an improvement."}
    )
    num_examples_to_print: int = field(default=3, metadata={"help": "Example predictions printed at the end."})


def default_tasks() -> list[dict[str, Any]]:
    """The embedded default job's tasks: topic, sentiment and NER, all from one small bundled dataset."""
    files = {
        "train": str(DEFAULT_DATA_DIR / "default_train.jsonl"),
        "validation": str(DEFAULT_DATA_DIR / "default_eval.jsonl"),
    }
    return [
        {"name": "topic", "type": "classification", "data_files": files, "label_column": "topic"},
        {"name": "sentiment", "type": "classification", "data_files": files, "label_column": "sentiment"},
        {
            "name": "ner",
            "type": "token_classification",
            "data_files": files,
            "tokens_column": "tokens",
            "tags_column": "ner_tags",
        },
    ]


# What `python train.py` with no arguments runs. Sized for a CPU laptop: a few minutes.
DEFAULT_JOB: dict[str, Any] = {
    "output_dir": "outputs/multitask-minilm-default",
    "max_seq_length": 64,
    "num_train_epochs": 6,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-4,
    "head_learning_rate": 2e-3,
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "load_best_model_at_end": True,
    "metric_for_best_model": "combined_score",
    "greater_is_better": True,
    "logging_steps": 10,
    "report_to": "none",
    "seed": 42,
}


def _to_flags(config: dict[str, Any]) -> list[str]:
    """Turn a config dict into command-line flags (so that later flags override the file)."""
    flags = []
    for key, value in config.items():
        if value is None:
            continue
        if key == "tasks" and not isinstance(value, str):
            flags += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            flags += [f"--{key}", str(value)]
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}", *[str(item) for item in value]]
        elif isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        config = yaml.safe_load(text) or {}
    else:
        config = json.loads(text)
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} must hold a mapping of argument names to values")
    return config


def parse_arguments(argv: list[str] | None = None):
    """Parse flags and/or a leading YAML/JSON config file into the four argument dataclasses.

    With no arguments at all, the embedded default job (`DEFAULT_JOB` on `default_tasks()`) is used.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, MultiTaskArguments, TrainingArguments))
    if not argv:
        argv = _to_flags({**DEFAULT_JOB, "tasks": default_tasks()})
    elif argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        argv = _to_flags(read_config_file(argv[0])) + argv[1:]
    if _cpu_only_distributed() and not any(arg.startswith("--use_cpu") for arg in argv):
        # Without `use_cpu`, TrainingArguments sets up a non-distributed state on a machine without GPUs, and
        # every launched process would train alone; with it, the processes join one gloo process group.
        argv += ["--use_cpu", "true"]
    model_args, data_args, mtl_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, mtl_args, training_args


def _cpu_only_distributed() -> bool:
    import torch

    # WORLD_SIZE comes from torchrun / `accelerate launch --multi_gpu`; the others from mpirun (Open MPI, Intel MPI,
    # MVAPICH), the same list accelerate reads. `accelerate launch --cpu --mpirun_hostfile` also sets
    # ACCELERATE_USE_CPU, which TrainingArguments honours; a bare `mpirun -n 2 python train.py` needs this check.
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    world_size = max(int(os.environ.get(name) or 1) for name in names)
    return world_size > 1 and not torch.cuda.is_available()


def describe_hardware(training_args: TrainingArguments) -> str:
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{device}, {training_args.world_size} process(es), torch {torch.__version__}, {platform.system()}"


def non_default_hyperparameters(training_args: TrainingArguments, *extra) -> dict[str, Any]:
    """The TrainingArguments, model, data and multi-task options that differ from their defaults."""
    defaults = {f.name: f.default for f in fields(TrainingArguments) if f.init}
    skip = {
        "output_dir",
        "logging_dir",
        "hub_token",
        "push_to_hub_token",
        "report_to",
        "run_name",
        "accelerator_config",
        "disable_tqdm",
        "debug",
    }
    result = {}
    given = training_args.to_dict()
    for key, value in given.items():
        if key in skip or key not in defaults:
            continue
        default = defaults[key]
        if hasattr(default, "value"):
            default = default.value
        if value in (None, False, [], {}, "") and default in (None, False, MISSING):
            continue  # unset either way (the dataclass default was None or a factory)
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


def _format_prediction(prediction: dict[str, Any]) -> str:
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
        else:
            parts.append(f"{task}={value}")
    return "; ".join(parts)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """Train, evaluate and save a multi-task model. Returns 0 on success (the CLI's exit code).

    Args:
        argv: command-line arguments (default `sys.argv[1:]`); empty runs the embedded default job.
        callbacks: extra `TrainerCallback`s (for programmatic use).
    """
    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone
    from multitask_st.data import MultiTaskCollator, build_datasets, parse_task_specs
    from multitask_st.metrics import build_compute_metrics, split_metrics
    from multitask_st.trainer import MultiTaskTrainer, apply_freezing, detach_loss_weighting

    started = time.time()
    model_args, data_args, mtl_args, training_args = parse_arguments(argv)
    if training_args.output_dir is None:
        training_args.output_dir = "outputs/multitask-model"
    set_seed(training_args.seed)
    model_name = model_args.model_name_or_path or default_backbone()
    specs = parse_task_specs(data_args.tasks)
    for spec in specs:
        if spec.head is None and model_args.head_type != "linear":
            spec.head = model_args.head_type

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    max_seq_length = model_args.max_seq_length
    if max_seq_length is None:
        from modeling_mtl import read_sentence_transformers_settings

        settings = read_sentence_transformers_settings(model_name)
        model_max = getattr(tokenizer, "model_max_length", 512)
        max_seq_length = settings.get("max_seq_length") or min(512, model_max if model_max < 100_000 else 512)

    # The main process tokenises first and fills the `datasets` cache; the others then read it.
    with training_args.main_process_first(desc="tokenizing the datasets"):
        data = build_datasets(
            specs,
            tokenizer,
            max_seq_length,
            label_all_subtokens=data_args.label_all_subtokens,
            seed=training_args.seed,
            cache_dir=data_args.dataset_cache_dir,
            do_eval=True,  # eval splits, when given, are scored at the end even with eval_strategy "no"
        )

    model = MultiTaskModel.from_backbone(
        model_name,
        tasks=data.model_tasks,
        pooling=model_args.pooling,
        normalize=model_args.normalize,
        max_seq_length=max_seq_length,
        projection_dim=model_args.projection_dim,
        tokenizer=tokenizer,
        head_dropout=model_args.head_dropout,
    )
    frozen = apply_freezing(
        model, mtl_args.freeze_backbone, mtl_args.freeze_embeddings, mtl_args.freeze_layers, mtl_args.freeze_heads
    )
    if frozen:
        logger.warning(f"froze {len(frozen)} parameter tensors")

    if data.eval is None and training_args.eval_strategy != "no":
        raise ValueError("eval_strategy needs eval splits: set `eval_split` on the tasks or --eval_strategy no")
    callbacks = list(callbacks or [])
    if mtl_args.early_stopping_patience is not None:
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=mtl_args.early_stopping_patience,
                early_stopping_threshold=mtl_args.early_stopping_threshold,
            )
        )
    trainer = MultiTaskTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=MultiTaskCollator(tokenizer, model.config.tasks),
        processing_class=tokenizer,
        compute_metrics=build_compute_metrics(model.config.tasks),
        callbacks=callbacks,
        source_sizes=data.source_sizes,
        task_sampling=mtl_args.task_sampling,
        sampling_temperature=mtl_args.sampling_temperature,
        loss_weighting=mtl_args.loss_weighting,
        head_learning_rate=mtl_args.head_learning_rate,
        layerwise_lr_decay=mtl_args.layerwise_lr_decay,
    )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    train_result = trainer.train(resume_from_checkpoint=resume or None)
    train_runtime = train_result.metrics.get("train_runtime", time.time() - started)
    learned_weights = detach_loss_weighting(trainer.model)

    trainer.save_model(training_args.output_dir)
    trainer.log_metrics("train", train_result.metrics)
    metrics: dict[str, Any] = {}
    if data.eval is not None:
        eval_metrics = trainer.evaluate()
        metrics["eval"] = split_metrics(eval_metrics, model.task_names, "eval")
        metrics["combined_score"] = eval_metrics.get("eval_combined_score")
    if data.test is not None:
        test_metrics = trainer.evaluate(data.test, metric_key_prefix="test")
        metrics["test"] = split_metrics(test_metrics, model.task_names, "test")
        metrics["test_combined_score"] = test_metrics.get("test_combined_score")
    trainer.save_state()

    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        hyperparameters = non_default_hyperparameters(
            training_args, model_args, mtl_args, DataArguments(label_all_subtokens=data_args.label_all_subtokens)
        )
        if learned_weights is not None:
            hyperparameters["learned_task_weights"] = learned_weights
        training_config = {
            "base_model": str(model_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2"),
            "tasks": {
                spec.name: {
                    "type": spec.type,
                    "dataset": spec.describe_dataset(),
                    "dataset_config": spec.dataset_config,
                    "train_split": spec.train_split,
                    "eval_split": spec.eval_split,
                    "test_split": spec.test_split,
                    "num_train_examples": data.num_train_examples.get(spec.name, 0),
                    "labels": spec.labels,
                    "text_column": spec.text_column if spec.type != "token_classification" else None,
                    "label_column": spec.label_column if spec.type != "token_classification" else None,
                }
                for spec in specs
            },
            "hyperparameters": hyperparameters,
            "hardware": describe_hardware(training_args),
            "train_runtime_s": round(float(train_runtime), 2),
        }
        (output_dir / "training_config.json").write_text(json.dumps(training_config, indent=2) + "\n")
        try:
            from multitask_st.model_card import write_model_card

            write_model_card(output_dir)
        except ImportError:
            logger.warning("multitask_st.model_card is not available: no model card written")

        print("\n=== per-task metrics (eval) ===")
        for task, scores in metrics.get("eval", {}).items():
            print(
                f"  {task:<16} "
                + "  ".join(f"{name}={value:.4f}" for name, value in sorted(scores.items()) if isinstance(value, float))
            )
        if "combined_score" in metrics:
            print(f"  combined score   {metrics['combined_score']:.4f}")
        for task, scores in metrics.get("test", {}).items():
            print(
                f"  test {task:<11} "
                + "  ".join(f"{name}={value:.4f}" for name, value in sorted(scores.items()) if isinstance(value, float))
            )
        examples = data.examples[: mtl_args.num_examples_to_print]
        if examples:
            print("\n=== example predictions ===")
            model = trainer.model
            for example, prediction in zip(examples, model.predict(examples)):
                text = example if isinstance(example, str) else " ".join(example)
                print(f"  {text[:100]!r}\n    -> {_format_prediction(prediction)}")
        print(f"\nModel saved to {output_dir.resolve()}")
        print(
            f"Load it with: MultiTaskModel.from_pretrained({str(output_dir)!r})  (or AutoModel with "
            "trust_remote_code=True)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
