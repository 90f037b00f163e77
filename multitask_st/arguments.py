"""The options of multi-task training, each declared once: `MultiTaskTrainingArguments` (a `TrainingArguments`
with the multi-task trainer's options, as sentence-transformers' `SentenceTransformerTrainingArguments` is) and
`HeadSettings` (the head a task gets when its spec sets none).

`train.py` parses them with `HfArgumentParser` (every field is a command-line flag with its help text), the trainer
reads them from `args`, and their checks run when they are made, so a bad value fails before any model or data is
loaded. Adding an option is one field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from validation_mtl import InputError, UserError, check_int, check_number, is_int, is_number

SAMPLING_STRATEGIES = ("temperature", "proportional", "uniform", "round_robin")
LOSS_WEIGHTINGS = ("static", "uncertainty")
PROTECTIONS = ("auto", "distillation", "isolation", "l2sp", "none")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"{name} '{value}' is not one of {list(choices)}")
    return value


# The packages of the `report_to` integrations whose pip name is not the integration's.
_INTEGRATION_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit"}


def check_report_to(report_to: list[str]) -> None:
    """Each `report_to` integration is one transformers knows and can use here: the Trainer would otherwise fail only
    when it is made, after the model and data are loaded."""
    from transformers.integrations import integration_utils as integrations

    available = set(integrations.get_available_reporting_integrations())
    # Two that the list leaves out even when installed (azure_ml beside mlflow, flyte always).
    available |= {"azure_ml"} if integrations.is_azureml_available() else set()
    available |= {"flyte"} if integrations.is_flytekit_available() else set()
    for name in report_to:
        check_choice("report_to", name, tuple(integrations.INTEGRATION_TO_CALLBACK))
        if name not in available:
            package = _INTEGRATION_PACKAGES.get(name, name)
            raise InputError(
                f"report_to '{name}' needs the {package} package, which is not installed or not usable here: "
                f"`pip install {package}`, or --report_to none"
            )


@dataclass
class MultiTaskTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the options of `MultiTaskTrainer` (every other field is the Trainer's own)."""

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
        default=None,
        metadata={
            "help": "Learning rate of heads (with their own layers), pooling and projection (default: learning_rate)."
        },
    )
    layerwise_lr_decay: float | None = field(
        default=None, metadata={"help": "Per-layer learning-rate decay factor down the encoder (e.g. 0.9)."}
    )
    embedding_protection: str = field(
        default="auto",
        metadata={
            "help": "Keep the sentence embedding while heads train: distillation, isolation, l2sp, none, or auto "
            "(isolation when a task trains the embedding, distillation otherwise)."
        },
    )
    protection_weight: float | None = field(
        default=None,
        metadata={
            "help": "Factor of the protection term (default: multitask_st.protection.DEFAULT_PROTECTION_WEIGHT); for "
            "isolation, the share of the heads' gradients kept out of the shared encoder (0 to 1; below 1 it only "
            "means something beside a task that trains the embedding)."
        },
    )
    freeze_encoder_steps: float = field(
        default=0,
        metadata={
            "help": "Train only the heads for the first N optimizer steps (below 1: that share of the steps), then "
            "everything: linear probing then fine-tuning (LP-FT)."
        },
    )
    drift_sample_size: int = field(
        default=1000, metadata={"help": "Eval texts on which each evaluation measures the embedding's drift (0: off)."}
    )
    drift_warning_cosine: float = field(
        default=0.9,
        metadata={
            "help": "Warn when the mean cosine to the initial embedding falls below this (in runs without a task "
            "that trains the embedding)."
        },
    )

    def __post_init__(self):
        self.check_multitask_options()
        self.check_trainer_options()
        try:
            super().__post_init__()
        except UserError:
            raise
        except (ValueError, TypeError) as error:  # TrainingArguments' own checks of what the user set
            raise InputError(str(error)) from None
        check_report_to(self.report_to)  # a list once TrainingArguments has read "all" / "none" / a name

    def check_trainer_options(self) -> None:
        """The checks TrainingArguments leaves out: each of these values would train nothing (and save the untrained
        model as a finished run) or fail only once training starts."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_int(name, getattr(self, name), minimum=1)
        if not is_int(self.max_steps) or self.max_steps <= 0:  # the Trainer reads max_steps <= 0 as "use the epochs"
            if not is_number(self.num_train_epochs) or self.num_train_epochs <= 0:
                raise InputError(
                    f"num_train_epochs must be a finite number > 0 (or max_steps > 0), got {self.num_train_epochs!r}: "
                    "the run would train nothing"
                )

    def check_multitask_options(self) -> None:
        """The checks of the multi-task options (those that need neither model nor data; the protection's weight
        depends on the tasks and is checked with them)."""
        check_choice("task_sampling", self.task_sampling, SAMPLING_STRATEGIES)
        check_number("sampling_temperature", self.sampling_temperature, minimum=0, open_low=True)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if self.head_learning_rate is not None:
            check_number("head_learning_rate", self.head_learning_rate, minimum=0, open_low=True)
        if self.layerwise_lr_decay is not None:
            check_number("layerwise_lr_decay", self.layerwise_lr_decay, minimum=0, maximum=1, open_low=True)
        check_choice("embedding_protection", self.embedding_protection, PROTECTIONS)
        if self.protection_weight is not None:
            check_number("protection_weight", self.protection_weight, minimum=0)
        steps = self.freeze_encoder_steps
        if not is_number(steps) or steps < 0 or (steps > 1 and steps != int(steps)):
            raise InputError(
                f"freeze_encoder_steps must be a whole number of steps or a share of them below 1, got {steps!r}"
            )
        check_int("drift_sample_size", self.drift_sample_size, minimum=0)
        check_number("drift_warning_cosine", self.drift_warning_cosine, minimum=-1, maximum=1)

    @classmethod
    def multitask_fields(cls) -> list[str]:
        """The names of the fields this class adds to `TrainingArguments`."""
        own = {f.name for f in fields(TrainingArguments)}
        return [f.name for f in fields(cls) if f.name not in own]

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **options: Any) -> MultiTaskTrainingArguments:
        """`args` (a plain `TrainingArguments`, or one of these) with multi-task `options` set."""
        values = {f.name: getattr(args, f.name) for f in fields(args) if f.init and hasattr(args, f.name)}
        values = {key: value for key, value in values.items() if key in {f.name for f in fields(cls) if f.init}}
        unknown = sorted(set(options) - set(cls.multitask_fields()))
        if unknown:
            raise InputError(f"unknown multi-task option(s) {unknown}; options: {cls.multitask_fields()}")
        return cls(**{**values, **options})


@dataclass
class HeadSettings:
    """The head a task gets when its spec sets none (`Task.default_head` picks what applies to its type)."""

    head_type: str = field(default="linear", metadata={"help": "Default head for tasks that set none: linear or mlp."})
    token_head_type: str = field(
        default="linear",
        metadata={"help": "Default head of token tasks: linear, mlp, or transformer (a transformer layer of its own)."},
    )
    head_layers: int = field(
        default=2,
        metadata={"help": "Sentence heads with their own pooling get their own copies of the encoder's top N layers."},
    )
    token_head_layers: int = field(
        default=2, metadata={"help": "Token heads get their own copies of the encoder's top N layers (0: none)."}
    )
    head_pooling: str = field(
        default="attention",
        metadata={
            "help": "What sentence-level heads read by default: shared (the embedding's pooled vector) or attention "
            "(each head its own attention pooling of the token states)."
        },
    )

    def head_settings(self) -> HeadSettings:
        """These settings alone (from a subclass holding more options)."""
        return HeadSettings(**{f.name: getattr(self, f.name) for f in fields(HeadSettings)})


__all__ = ["HeadSettings", "MultiTaskTrainingArguments", "LOSS_WEIGHTINGS", "PROTECTIONS", "SAMPLING_STRATEGIES"]
