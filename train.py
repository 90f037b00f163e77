"""Train a multi-task sentence transformer with the `transformers.Trainer`.

    python train.py                                  # the embedded default job (all-MiniLM-L6-v2, CPU, minutes)
    python train.py --output_dir out --seed 1        # flags alone change the embedded default job
    python train.py config.yaml [--flag value ...]   # a YAML/JSON config file; flags after it override it
    python train.py --tasks tasks.json --output_dir out --num_train_epochs 3 ...
    accelerate launch --multi_gpu --num_processes 2 train.py config.yaml   # same arguments, two processes

Every `TrainingArguments` flag works, and the multi-task trainer's options are flags of the same
`MultiTaskTrainingArguments` (see `python train.py --help`); the defaults are the project's measured recipe
(`RECIPE`), not the plain Trainer's. A configuration, data or training error is one line on stderr (exit code 2;
`MTL_DEBUG=1` adds its traceback); any other error keeps its traceback. Tasks are a JSON/YAML list of dicts
(`multitask_st.data.TaskDataSpec`), e.g.
    [{"name": "sentiment", "type": "classification", "dataset": "data/sst2", "text_column": "sentence",
      "label_column": "label", "labels": ["negative", "positive"]},
     {"name": "ner", "type": "token_classification", "dataset": "data/wikiann-en"}]
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, EarlyStoppingCallback, HfArgumentParser, set_seed
from transformers.utils import logging

from multitask_st.arguments import HeadSettings, MultiTaskTrainingArguments
from multitask_st.errors import FileError, InputError, TrainingError, UserError
from multitask_st.records import non_default_hyperparameters

logger = logging.get_logger("train")

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "multitask_st" / "default_data"


@dataclass
class ModelArguments(HeadSettings):
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
    head_dropout: float = field(default=0.1, metadata={"help": "Dropout before each head."})

    def __post_init__(self):
        name = self.model_name_or_path
        if name is not None and not os.path.exists(name):
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:  # a path that is not there might still be a Hub id; anything else would fail only when loaded
                validate_repo_id(name)
            except HFValidationError:
                raise InputError(f"model_name_or_path {name}: no such folder, and not a Hub model id") from None


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
class RunArguments:
    """What this script does around the trainer: freezing, LoRA, early stopping, the output folder, the report."""

    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the whole encoder (train heads only)."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Freeze the encoder's embeddings."})
    freeze_layers: int = field(default=0, metadata={"help": "Freeze the embeddings and the lowest N layers."})
    freeze_heads: list[str] | None = field(default=None, metadata={"help": "Task heads to keep frozen."})
    lora_rank: int = field(default=0, metadata={"help": "Train LoRA adapters of this rank on the encoder (0: off)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * rank)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Encoder linear layers to adapt, by name (default: all of them)."}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement of the best metric."}
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "How much the best metric must improve to count as an improvement."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a model already saved in output_dir (otherwise that is an error)."}
    )
    num_examples_to_print: int = field(default=3, metadata={"help": "Example predictions printed at the end."})


# The project's recipe (docs/TRAINING.md, measured in docs/RESULTS.md), used as the defaults of every run.
RECIPE: dict[str, Any] = {
    "learning_rate": 1e-4,
    "head_learning_rate": 2e-3,  # fresh heads (and their own layers) learn faster than the pretrained encoder
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    "logging_steps": 50,
    "report_to": "none",
}


def default_tasks() -> list[dict[str, Any]]:
    """The embedded default job's tasks: topic, sentiment and NER, all from one small bundled dataset."""
    files = {
        "train": str(DEFAULT_DATA_DIR / "default_train.jsonl"),
        "validation": str(DEFAULT_DATA_DIR / "default_eval.jsonl"),
    }
    return [
        {"name": "topic", "type": "classification", "data_files": files, "label_column": "topic"},
        {"name": "sentiment", "type": "classification", "data_files": files, "label_column": "sentiment"},
        {"name": "ner", "type": "token_classification", "data_files": files},
    ]


# What `python train.py` runs, and what flags given without `--tasks` or a config file change. Sized for a CPU
# laptop: a few minutes.
DEFAULT_JOB: dict[str, Any] = {
    "output_dir": "outputs/multitask-minilm-default",
    "max_seq_length": 64,
    "num_train_epochs": 6,
    "per_device_train_batch_size": 16,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "load_best_model_at_end": True,
    "metric_for_best_model": "combined_score",
    "greater_is_better": True,
    "logging_steps": 10,
    "seed": 42,
    "overwrite_output_dir": True,
    "tasks": default_tasks(),
}

ARGUMENT_CLASSES = (ModelArguments, DataArguments, RunArguments, MultiTaskTrainingArguments)


def read_config_file(path: str) -> dict[str, Any]:
    from multitask_st.data import read_json_or_yaml

    if not os.path.isfile(path):
        raise InputError(f"config file not found: {path}")
    config = read_json_or_yaml(path, "config file")
    if config is None:  # an empty YAML file
        return {}
    if not isinstance(config, dict):
        raise InputError(f"config file {path} must hold a mapping of argument names to values")
    return config


class _OneLineErrorParser(HfArgumentParser):
    """A bad flag is one line on stderr (exit 2), not argparse's usage block of every option first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_arguments(argv: list[str] | None = None):
    """The four argument dataclasses from an optional leading YAML/JSON config file and flags (flags win); every
    option is checked as its dataclass is made, before any model or data is loaded.

    Without a config file and without `--tasks`, the flags change the embedded default job (`DEFAULT_JOB`). The
    config's values, `tasks` included, are used as they are (no round trip through command-line strings).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    default_job = False
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-"):
        config = read_config_file(argv.pop(0))
    elif "--tasks" not in argv and not any(arg.startswith("--tasks=") for arg in argv):
        config, default_job = dict(DEFAULT_JOB), True
    else:
        config = {}
    parser = _OneLineErrorParser(ARGUMENT_CLASSES)
    recipe = ", ".join(f"{key} {value}" for key, value in RECIPE.items())
    parser.epilog = (
        "The defaults shown are the embedded default job's (no --tasks and no config file), which flags change. "
        f"With --tasks or a config file, unset options take the recipe's values ({recipe}, overwrite_output_dir "
        "False, output_dir outputs/multitask-model), then TrainingArguments' own."
        if default_job
        else f"Unset options take the recipe's values ({recipe}), then TrainingArguments' own."
    )
    known = {f.name for dataclass_type in ARGUMENT_CLASSES for f in fields(dataclass_type)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InputError(f"unknown option(s) {unknown} in the config; see `python train.py --help`")
    parser.set_defaults(**{**RECIPE, **config})
    if _cpu_only_distributed() and not any(arg.startswith("--use_cpu") for arg in argv):
        # Without `use_cpu`, TrainingArguments sets up a non-distributed state on a machine without GPUs, and
        # every launched process would train alone; with it, the processes join one gloo process group.
        argv += ["--use_cpu", "true"]
    pin_memory_given = "dataloader_pin_memory" in config or "--dataloader_pin_memory" in argv
    if not torch.accelerator.is_available() and not pin_memory_given:
        # Pinned memory only speeds up copies to an accelerator; without one, torch warns at every evaluation.
        argv += ["--dataloader_pin_memory", "false"]
    *parsed, unused = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unused:
        parser.error(f"unrecognized arguments: {' '.join(unused)}")
    model_args, data_args, run_args, training_args = parsed
    if training_args.output_dir is None:
        training_args.output_dir = "outputs/multitask-model"
    overwrite_asked = any(arg.startswith("--overwrite_output_dir") for arg in argv)
    if default_job and training_args.output_dir != DEFAULT_JOB["output_dir"] and not overwrite_asked:
        # The default job replaces its own earlier output, never a model in a folder the user pointed it at.
        run_args.overwrite_output_dir = False
    return model_args, data_args, run_args, training_args


def check_launch() -> None:
    """Refuse launches that would silently train differently from what was asked: `accelerate launch --cpu
    --num_processes N` without an MPI hostfile starts ONE process, and accelerate 1.x ignores an FSDP config on
    CPUs (the processes run plain DDP)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        raise TrainingError(
            "the accelerate config asks for FSDP, but accelerate only shards on GPUs: on this CPU-only machine its "
            "processes would run plain DDP. Use `accelerate launch --multi_gpu --num_processes N` (DDP over gloo) "
            "here, and the FSDP config on GPU machines (docs/TRAINING.md)"
        )
    launched_alone = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and not any(
        os.environ.get(name) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    )
    requested = _requested_processes(os.getppid()) if launched_alone else 1
    if requested > 1:
        raise TrainingError(
            f"`accelerate launch --cpu --num_processes {requested}` started ONE process: accelerate runs several CPU "
            "processes only through MPI (`--mpirun_hostfile hostfile`). Without MPI, `accelerate launch --multi_gpu "
            f"--num_processes {requested}` or `torchrun --nproc_per_node {requested}` start them over gloo"
        )


def _requested_processes(parent: int) -> int:
    """`--num_processes` of the `accelerate launch` command that started this process (1 if it was not one)."""
    try:
        arguments = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux, or the parent is gone: nothing to check
        return 1
    if not any("accelerate" in argument for argument in arguments[:3]) or "--mpirun_hostfile" in arguments:
        return 1
    for flag, value in zip(arguments, arguments[1:]):
        if flag == "--num_processes" and value.isdigit():
            return int(value)
    return 1


def _cpu_only_distributed() -> bool:
    # WORLD_SIZE comes from torchrun / `accelerate launch --multi_gpu`; the others from mpirun (Open MPI, Intel MPI,
    # MVAPICH), the same list accelerate reads. `accelerate launch --cpu --mpirun_hostfile` also sets
    # ACCELERATE_USE_CPU, which TrainingArguments honours; a bare `mpirun -n 2 python train.py` needs this check.
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    world_size = max(int(os.environ.get(name) or 1) for name in names)
    return world_size > 1 and not torch.cuda.is_available()


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """Train, evaluate and save a multi-task model. Returns 0 on success (the CLI's exit code).

    Args:
        argv: command-line arguments (default `sys.argv[1:]`); empty runs the embedded default job.
        callbacks: extra `TrainerCallback`s (for programmatic use).
    """
    from multitask_st import DEFAULT_BACKBONE_ID
    from multitask_st.records import describe_hardware, evaluate_splits, training_record
    from multitask_st.saving import save_run
    from multitask_st.trainer import detach_loss_weighting

    # 1. Arguments (each checked as it is parsed), launch, seed, output folder (never another run's model), the
    #    checkpoint to resume.
    check_launch()
    model_args, data_args, run_args, training_args = parse_arguments(argv)
    set_seed(training_args.seed)
    resume = _resume_target(training_args, run_args)

    # 2. Tokenizer, truncation length (one resolver, the model's) and the task data, tokenised once.
    specs, tokenizer, max_seq_length, data = _load_data(model_args, data_args, training_args)

    # 3. Model: the pretrained encoder with fresh heads; freezing; LoRA adapters.
    model = _build_model(model_args, run_args, data, tokenizer, max_seq_length)

    # 4. Trainer: collator and metrics follow from the model's tasks, its options from `training_args`.
    trainer = _build_trainer(model, training_args, run_args, data, callbacks)

    # 5. Train (a non-finite loss stops the run with an error: nothing is saved as a model).
    train_result = trainer.train(resume_from_checkpoint=resume)
    learned_weights = detach_loss_weighting(trainer.model)
    trainer.log_metrics("train", train_result.metrics)

    # 6. Evaluate on the eval and test splits (task metrics and the embedding's drift).
    metrics = evaluate_splits(trainer, data)
    trainer.save_state()

    # 7. Save: model, metrics, training record and card to a staging folder, then into output_dir, config.json last.
    hyperparameters = non_default_hyperparameters(
        training_args, model_args, run_args, DataArguments(label_all_subtokens=data_args.label_all_subtokens)
    )
    if learned_weights is not None:
        hyperparameters["learned_task_weights"] = learned_weights
    record = training_record(
        specs,
        data,
        model_args.model_name_or_path or DEFAULT_BACKBONE_ID,
        hyperparameters,
        describe_hardware(training_args),
        train_result.metrics.get("train_runtime", 0.0),
    )
    record["embedding_protection"] = {"method": trainer.protection.method, "weight": trainer.protection.weight}
    output_dir = save_run(trainer, training_args.output_dir, metrics, record, lora=bool(run_args.lora_rank))
    if trainer.is_world_process_zero():
        _report(trainer, data, metrics, output_dir, run_args.num_examples_to_print)
    return 0


def _resume_target(training_args: MultiTaskTrainingArguments, run_args: RunArguments) -> str | None:
    from multitask_st.checkpoints import check_checkpoint_files, last_complete_checkpoint
    from multitask_st.saving import check_output_dir

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    check_output_dir(training_args.output_dir, bool(resume), run_args.overwrite_output_dir)
    _check_writable(training_args.output_dir)
    if resume is True:
        return last_complete_checkpoint(training_args.output_dir)
    if resume:  # a checkpoint the user named: a damaged file in it is an error now, before anything is loaded
        check_checkpoint_files(resume)
    return resume or None


def _check_writable(output_dir: str) -> None:
    """Make `output_dir` and write a file in it now: a folder that cannot be written would otherwise fail only at the
    first checkpoint, or at the final save after the whole run."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise FileError(f"output_dir {folder} cannot be written: {error.strerror or error}") from None


def _load_data(model_args: ModelArguments, data_args: DataArguments, training_args: MultiTaskTrainingArguments):
    from io_mtl import read_sentence_transformers_settings
    from multitask_st import default_backbone
    from multitask_st.data import build_datasets, parse_task_specs
    from validation_mtl import resolve_max_seq_length

    model_name = model_args.model_name_or_path or default_backbone()
    specs = parse_task_specs(data_args.tasks)
    for spec in specs:  # the default head of tasks that set none
        head = spec.task_type.default_head(model_args)
        if head and "head" not in spec.model_options:
            spec.model_options["head"] = head
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    max_seq_length = resolve_max_seq_length(
        AutoConfig.from_pretrained(model_name),
        tokenizer,
        read_sentence_transformers_settings(model_name),
        model_args.max_seq_length,
    )
    with training_args.main_process_first(desc="tokenizing the datasets"):  # the others then read the cache
        data = build_datasets(
            specs,
            tokenizer,
            max_seq_length,
            label_all_subtokens=data_args.label_all_subtokens,
            seed=training_args.seed,
            cache_dir=data_args.dataset_cache_dir,
        )
    if data.eval is None and training_args.eval_strategy != "no":
        raise InputError("eval_strategy needs eval splits: set `eval_split` on the tasks or --eval_strategy no")
    return specs, tokenizer, max_seq_length, data


def _build_model(model_args: ModelArguments, run_args: RunArguments, data, tokenizer, max_seq_length: int):
    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone
    from multitask_st.lora import apply_lora
    from multitask_st.trainer import apply_freezing

    model = MultiTaskModel.from_backbone(
        model_args.model_name_or_path or default_backbone(),
        tasks=data.model_tasks,
        pooling=model_args.pooling,
        normalize=model_args.normalize,
        max_seq_length=max_seq_length,
        projection_dim=model_args.projection_dim,
        tokenizer=tokenizer,
        head_dropout=model_args.head_dropout,
    )
    frozen = apply_freezing(
        model, run_args.freeze_backbone, run_args.freeze_embeddings, run_args.freeze_layers, run_args.freeze_heads
    )
    if frozen:
        logger.warning(f"froze {len(frozen)} parameter tensors")
    if run_args.lora_rank:
        model = apply_lora(
            model, run_args.lora_rank, run_args.lora_alpha, run_args.lora_dropout, run_args.lora_target_modules
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    return model


def _build_trainer(model, training_args: MultiTaskTrainingArguments, run_args: RunArguments, data, callbacks):
    from multitask_st.trainer import MultiTaskTrainer

    callbacks = list(callbacks or [])
    if run_args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(run_args.early_stopping_patience, run_args.early_stopping_threshold))
    return MultiTaskTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        callbacks=callbacks,
        source_sizes=data.source_sizes,
    )


def _report(trainer, data, metrics: dict, output_dir: Path, count: int) -> None:
    """Print per-task metrics, the embedding's drift and a few example predictions."""
    from multitask_st.records import format_prediction

    for split in ("eval", "test"):
        for task, scores in metrics.get(split, {}).items():
            values = "  ".join(f"{k}={v:.4f}" for k, v in sorted(scores.items()) if isinstance(v, float))
            print(f"  {split:<5} {task:<16} {values}")
    if metrics.get("combined_score") is not None:
        print(f"  combined score   {metrics['combined_score']:.4f}")
    for split, drift in metrics.get("embedding", {}).items():
        print(f"  {split:<5} embedding drift  " + "  ".join(f"{k}={v:.4f}" for k, v in drift.items()))
    model = trainer.accelerator.unwrap_model(trainer.model)
    shown = set()
    for examples in data.examples.values():  # per source: texts, word lists or pairs, a few of each
        examples = [example for example in examples if repr(example) not in shown][:count]
        if not examples:
            continue
        if not shown:
            print("\n=== example predictions ===")
        shown.update(repr(example) for example in examples)
        for example, prediction in zip(examples, model.predict(examples)):
            text = (
                " | ".join(example)
                if isinstance(example, tuple)
                else example
                if isinstance(example, str)
                else " ".join(example)
            )
            print(f"  {text[:100]!r}\n    -> {format_prediction(prediction, model.config)}")
    print(f"\nModel saved to {output_dir.resolve()}")
    print(
        f"Load it with: MultiTaskModel.from_pretrained({str(output_dir)!r})  (or AutoModel with trust_remote_code=True)"
    )


def run(argv: list[str] | None = None) -> int:
    """`main` as a command (`python train.py`, `mtl train`): an error in what the user gave (configuration, data, a
    run that cannot go on: `UserError`) is one line on stderr and exit code 2, with its traceback when `MTL_DEBUG` is
    set; any other error keeps its traceback."""
    import gc

    try:
        return main(argv)
    except UserError as error:
        if os.environ.get("MTL_DEBUG"):
            raise
        message = f"error: {error}"
    # Out of the except block, the error's traceback no longer holds the failed run's frames: its progress bars
    # close (and print) now, before the message, which stays last.
    gc.collect()
    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run())
