"""`MultiTaskTrainer`: the `transformers.Trainer` with a multi-task loss, task sampling, per-task logging,
adaptive loss weighting, embedding protection and drift, freezing and per-group learning rates. Its options are
fields of `MultiTaskTrainingArguments` (`multitask_st.arguments`), read from `self.args`.

It overrides only what multi-task training changes:
- `__init__`: the collator and `compute_metrics` follow from `model.config.tasks` unless given;
- `_get_train_sampler`: batches drawn per data source by the task-sampling strategy (`multitask_st.sampling`);
- `_get_num_items_in_batch`: per-task label counts, so gradient accumulation and DDP keep exact means;
- `compute_loss`: weighted (static or learned) sum of the per-task losses the model returns, plus the embedding
  protection term (`multitask_st.protection`);
- `prediction_step` / `evaluation_loop`: per-task predictions and losses for `compute_metrics` (what each task's
  metrics need is its type's: `Task.eval_predictions` / `.eval_references`), and the embedding's drift from its
  initial state (`multitask_st.drift`);
- `log`: adds `loss/<task>` (train) beside `loss`;
- `_clip_grad_norm`: the clipping threshold scaled by the step's loss weights, so that clipping does not undo them;
- `create_optimizer`: separate head learning rate and layer-wise learning-rate decay;
- `_determine_best_metric`: a `metric_for_best_model` the evaluation does not report is one error, not a KeyError
  (most are refused when the trainer is made: `_check_metric_for_best_model`).
Everything else (checkpointing, resuming, DDP via accelerate, mixed precision, callbacks) is the Trainer's own.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from layers_mtl import IGNORE_INDEX, labelled_mask
from tasks_mtl import make_task
from validation_mtl import InputError

from .arguments import LOSS_WEIGHTINGS, SAMPLING_STRATEGIES, MultiTaskTrainingArguments  # noqa: F401
from .checkpoints import PROTECTION_FILE, check_resumable, last_complete_checkpoint
from .data import MultiTaskCollator, StreamedSources
from .drift import EmbeddingDrift, drift_sample
from .errors import TrainingError
from .lora import LORA_CONFIG_FILE, unwrap
from .metrics import SEPARATOR, build_compute_metrics, metric_key
from .protection import EmbeddingProtection
from .sampling import MultiTaskSampler, MultiTaskStream, sampling_probabilities  # noqa: F401

logger = logging.get_logger(__name__)

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|block|blocks|h)\.(\d+)\.")


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty task weighting (Kendall, Gal & Cipolla, 2018).

    With `s_t = log σ_t²` learned per task: `L = Σ_t exp(-s_t) · w_t · L_t + ½ s_t`. A task whose loss stays
    high (noisy or hard) gets a larger σ and so a smaller weight; the `½ s_t` term stops σ from growing forever.
    """

    def __init__(self, task_names: list[str]):
        super().__init__()
        self.task_names = list(task_names)
        self.log_variance = nn.Parameter(torch.zeros(len(self.task_names)))

    def weights(self) -> dict[str, float]:
        return {name: float(torch.exp(-value)) for name, value in zip(self.task_names, self.log_variance.detach())}

    def forward(
        self, task_losses: dict[str, torch.Tensor], static_weights: dict[str, float], regularizer_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (weighted task losses, regulariser); the regulariser is added once per optimizer step."""
        weighted = 0.0
        for index, name in enumerate(self.task_names):
            if name in task_losses:
                weighted = weighted + torch.exp(-self.log_variance[index]) * static_weights[name] * task_losses[name]
        regularizer = 0.5 * self.log_variance.sum() * regularizer_scale
        return weighted, regularizer


def apply_freezing(
    model: nn.Module,
    freeze_backbone: bool = False,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    freeze_heads: list[str] | None = None,
) -> list[str]:
    """Set `requires_grad=False` on the chosen parameters; return their names.

    Args:
        freeze_backbone: the whole encoder (heads, pooling and projection still train: a "linear probe").
        freeze_embeddings: the encoder's embedding layer.
        freeze_layers: the lowest N transformer layers (with the embeddings, since they sit below them).
        freeze_heads: names of task heads to keep fixed (e.g. heads loaded from a previous run).
    """
    frozen = []
    heads = set(freeze_heads or [])
    unknown = heads - set(getattr(model, "heads", {}).keys())
    if unknown:
        raise InputError(f"freeze_heads: unknown task(s) {sorted(unknown)}; tasks are {list(model.heads.keys())}")
    if freeze_layers < 0:
        raise InputError(f"freeze_layers must be >= 0, got {freeze_layers}")
    num_layers = backbone_num_layers(model)
    if freeze_layers > num_layers:
        raise InputError(f"freeze_layers={freeze_layers} exceeds the backbone's {num_layers} layers")
    for name, parameter in model.named_parameters():
        freeze = False
        if name.startswith("backbone."):
            layer = _layer_index(name)
            is_embedding = layer is None and "embed" in name
            freeze = (
                freeze_backbone
                or (freeze_embeddings and is_embedding)
                or (freeze_layers > 0 and (is_embedding or (layer is not None and layer < freeze_layers)))
            )
        elif name.startswith("heads."):
            freeze = name.split(".")[1] in heads
        if freeze:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def backbone_num_layers(model: nn.Module) -> int:
    indices = [_layer_index(name) for name, _ in model.named_parameters() if name.startswith("backbone.")]
    indices = [index for index in indices if index is not None]
    return max(indices) + 1 if indices else 0


def clip_factor(loss_weights) -> float:
    """What a step's clipping threshold is multiplied by: the mean static `loss_weight` of the tasks it trains. A
    weight-0 task adds nothing to the step's gradient but the protection term's, so it does not count; with none
    left, 1 (`MultiTaskTrainer._clip_grad_norm`)."""
    weights = [weight for weight in loss_weights if weight > 0]
    return float(np.mean(weights)) if weights else 1.0


class MultiTaskTrainer(Trainer):
    """A `Trainer` for [`MultiTaskModel`]: the loss is the weighted sum of the per-task losses.

    The collator (`MultiTaskCollator`) and `compute_metrics` (per-task metrics and `combined_score`) are derived from
    `model.config.tasks` when not given, so `MultiTaskTrainer(model=model, args=args, train_dataset=data.train,
    eval_dataset=data.eval, source_sizes=data.source_sizes)` is the whole wiring.

    Args:
        args (`MultiTaskTrainingArguments`): the Trainer's arguments and the multi-task options (`task_sampling`,
            `loss_weighting`, `head_learning_rate`, `embedding_protection`, ...: see `multitask_st.arguments`). A
            plain `TrainingArguments` gets the options' defaults; an option given as a keyword argument here (as
            in earlier versions) is set on `args`.
        source_sizes (`list[int]`, *optional*):
            Rows per data source in `train_dataset` (as built by `multitask_st.data.build_datasets`); enables
            per-source batches drawn by `task_sampling`. Without it, batches are the Trainer's usual random ones.
        train_tasks (`list[str]`, *optional*): the tasks that have training rows in this run, when not all of the
            model's have (`continue_training`); what `auto` and the protection's warnings go by.
        All other arguments are those of `transformers.Trainer`.
    """

    loss_is_scaled_for_ga = True  # each task loss is normalised by its count over the whole accumulated step

    def __init__(self, *args, source_sizes: list[int] | None = None, train_tasks: list[str] | None = None, **kwargs):
        options = {name: kwargs.pop(name) for name in MultiTaskTrainingArguments.multitask_fields() if name in kwargs}
        args = list(args)
        training_args = kwargs.pop("args", args.pop(1) if len(args) > 1 else None)
        if training_args is None:
            training_args = MultiTaskTrainingArguments(output_dir="trainer_output")
        if options or not isinstance(training_args, MultiTaskTrainingArguments):
            if not isinstance(training_args, TrainingArguments):
                raise InputError(f"args must be a TrainingArguments, got {type(training_args).__name__}")
            training_args = MultiTaskTrainingArguments.from_training_arguments(training_args, **options)
        kwargs["args"] = training_args
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise InputError("MultiTaskTrainer needs a `model`")
        base = unwrap(model)
        self.task_configs = list(base.config.tasks)
        self.tasks = [make_task(task) for task in self.task_configs]
        self.task_names = [task.name for task in self.tasks]
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = MultiTaskCollator(base.tokenizer, self.task_configs)
        own_metrics = kwargs.get("compute_metrics") is None
        if own_metrics:
            kwargs["compute_metrics"] = build_compute_metrics(self.task_configs)
        if kwargs.get("processing_class") is None and base.tokenizer is not None:
            kwargs["processing_class"] = base.tokenizer
        if training_args.loss_weighting == "uncertainty" and not hasattr(base, "loss_weighting"):
            # Registered on the model so that the optimizer, DDP and checkpoints handle it like any weight;
            # `detach_loss_weighting` removes it before the final save.
            base.add_module("loss_weighting", UncertaintyWeighting(self.task_names))
        # The protection and the drift reference are taken from the model as it is handed over: before training.
        self.protection = EmbeddingProtection(
            model, training_args.embedding_protection, training_args.protection_weight, train_tasks
        )
        self.train_tasks = None if train_tasks is None else list(train_tasks)
        if self.protection.isolates and not self.protection.embedding_tasks:
            # No task would ever send the shared encoder a gradient: freeze it (no optimizer state, no backward).
            for parameter in shared_parameters(base):
                parameter.requires_grad_(False)
        eval_dataset = kwargs.get("eval_dataset")
        self.drift = None
        if training_args.drift_sample_size and isinstance(eval_dataset, Dataset) and len(eval_dataset):
            self.drift = EmbeddingDrift(model, drift_sample(eval_dataset, training_args.drift_sample_size))
        if own_metrics and eval_dataset is not None and not isinstance(eval_dataset, dict):  # a dict: other keys
            self._check_metric_for_best_model(training_args.metric_for_best_model)
        if isinstance(kwargs.get("train_dataset"), StreamedSources):  # streamed sources: blocks drawn as they come
            streamed = kwargs["train_dataset"]
            source_sizes = streamed.sizes
            kwargs["train_dataset"] = MultiTaskStream(
                streamed.sources,
                streamed.sizes,
                training_args.per_device_train_batch_size,
                training_args.task_sampling,
                training_args.sampling_temperature,
                training_args.seed,
            )
        super().__init__(*args, **kwargs)
        self.protection.to(self.args.device)
        self.source_sizes = source_sizes
        self._log_names = [*self.task_names, self.protection.name]
        self._reset_task_logs()
        self._eval_sums: dict[str, float] = {}
        self._eval_counts: dict[str, float] = {}
        self._idle_tasks: list[str] = []
        self._step_loss_weight = (-1, 1.0)  # (global step, mean loss_weight of its tasks): `_clip_grad_norm`

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the last *complete* checkpoint, and a checkpoint
        trained with other tasks or loss weighting is refused (`multitask_st.checkpoints.check_resumable`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str):
            check_resumable(resume_from_checkpoint, self.model, self.args.loss_weighting, self._protection_record())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_metric_for_best_model(self, name: str | None) -> None:
        """Refuse a `metric_for_best_model` that this run's evaluation never reports now, before training: the
        Trainer finds out at the first evaluation. The combined score, losses, primary metrics and which tasks exist
        are known now; a task's other metrics are known once computed, so a misspelt one of those is one error at the
        first evaluation (`_determine_best_metric`)."""
        if name is None:
            return
        key = name.removeprefix("eval_")  # the Trainer adds the prefix when it is missing
        choices = ["combined_score", "loss"]
        choices += [metric_key(task.name, metric) for task in self.tasks for metric in ("loss", task.primary_metric)]
        owners = self.task_names + (["embedding"] if self.drift is not None else [])
        if key in choices or (SEPARATOR in key and key.split(SEPARATOR, 1)[0] in owners):
            return
        if self.drift is not None:
            choices.append(metric_key("embedding", "cosine_to_initial"))
        raise InputError(
            f"metric_for_best_model '{name}' is not a metric this run's evaluation reports: choose one of {choices}, "
            "or another metric a task reports, as '<task>/<metric>'"
        )

    def _determine_best_metric(self, metrics: dict[str, float], trial=None) -> bool:
        try:
            return super()._determine_best_metric(metrics, trial)
        except KeyError:  # the Trainer's error is a traceback; this is a setting the user can fix
            if self.args.metric_for_best_model is None:
                raise
            reported = sorted(key.removeprefix("eval_") for key in metrics if key.startswith("eval_"))
            raise InputError(
                f"metric_for_best_model '{self.args.metric_for_best_model}' is not among the metrics the evaluation "
                f"reported: {reported}"
            ) from None

    def _protection_record(self) -> dict[str, Any]:
        # Whether the shared encoder is frozen decides what the optimizer state holds, and with `train_tasks` it is
        # not implied by method and weight alone (isolation 1 freezes it only when no embedding task trains).
        frozen = self.protection.isolates and not self.protection.embedding_tasks
        return {"method": self.protection.method, "weight": self.protection.weight, "frozen_encoder": frozen}

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's save; a LoRA checkpoint also records the model config (tasks, labels), and every checkpoint
        the embedding protection (which decides what the optimizer holds), which resuming checks
        (`multitask_st.checkpoints.check_resumable`)."""
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):
            unwrap(model).config.to_json_file(os.path.join(output_dir, LORA_CONFIG_FILE))
        if os.path.basename(os.path.normpath(output_dir)).startswith("checkpoint-"):
            with open(os.path.join(output_dir, PROTECTION_FILE), "w", encoding="utf-8") as handle:
                json.dump(self._protection_record(), handle)

    # ------------------------------------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.source_sizes is None or isinstance(dataset, IterableDataset):
            return super()._get_train_sampler(train_dataset)
        if sum(self.source_sizes) != len(dataset):
            raise InputError(
                f"source_sizes sum to {sum(self.source_sizes)} but the training set has {len(dataset)} rows"
            )
        return MultiTaskSampler(
            self.source_sizes,
            self._train_batch_size,
            self.args.task_sampling,
            self.args.sampling_temperature,
            self.args.seed,
            num_processes=self.args.world_size,
        )

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> dict[str, torch.Tensor] | None:
        """Per task, the labelled items in the whole accumulated step (summed over processes)."""
        if not batch_samples or "labels" not in batch_samples[0] or not isinstance(batch_samples[0]["labels"], dict):
            return super()._get_num_items_in_batch(batch_samples, device)
        counts = torch.zeros(len(self.task_names), dtype=torch.long, device=device)
        for batch in batch_samples:
            for index, name in enumerate(self.task_names):
                labels = batch["labels"].get(name)
                if labels is not None:
                    counts[index] += labelled_mask(labels).sum().to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        if self.is_in_train:
            outside = [n for i, n in enumerate(self.task_names) if counts[i] > 0 and n not in (self.train_tasks or [n])]
            if outside:  # the protection was chosen for train_tasks: rows of other tasks would train unprotected
                raise InputError(
                    f"the training data has labelled rows for task(s) {outside}, which are not in train_tasks "
                    f"{self.train_tasks}: add them to train_tasks or leave their rows out"
                )
            for index, name in enumerate(self.task_names):
                self._task_log_steps[name] += int(counts[index] > 0)
            self._idle_tasks = [name for index, name in enumerate(self.task_names) if counts[index] == 0]
            weights = [task["loss_weight"] for task, count in zip(self.task_configs, counts) if count > 0]
            self._step_loss_weight = (self.state.global_step, clip_factor(weights))
        return dict(zip(self.task_names, counts))

    # ------------------------------------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Passed only when it does something: a model saved by an older version of this package (loaded with its
        # own modeling_mtl.py) does not know the argument.
        head_scale = self.protection.head_gradient_scale
        extra = {"head_gradient_scale": head_scale} if head_scale != 1 else {}
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch, **extra)
        task_losses = outputs.task_losses or {}
        # With counts summed over processes each process holds sum_local / count_global; DDP averages
        # gradients over processes, so multiply back to get the gradient of the global mean.
        scale = self.args.world_size if (num_items_in_batch is not None and self.args.world_size > 1) else 1
        steps = getattr(self, "current_gradient_accumulation_steps", 1) or 1
        if self.args.loss_weighting == "uncertainty" and model.training:
            weighting = unwrap(self.accelerator.unwrap_model(model)).loss_weighting
            static = {task["name"]: task["loss_weight"] for task in self.task_configs}
            weighted, regularizer = weighting(task_losses, static, regularizer_scale=1.0 / steps)
            loss = weighted * scale + regularizer
        else:
            loss = outputs.loss * scale
        if model.training:
            protection = self.protection.loss(model, inputs, outputs.embeddings)
            if protection is not None:
                # A per-micro-batch mean (and, for L2-SP, one penalty per step): divided over the accumulated
                # micro-batches; DDP's gradient average then gives the mean over processes.
                loss = loss + protection / steps
                self._task_log_sums[self.protection.name] += protection.detach().float()
                self._task_log_steps[self.protection.name] += 1 / steps
            for name, value in task_losses.items():
                self._task_log_sums[name] += value.detach().float() * scale
            if not torch.isfinite(loss.detach()).item():
                losses = {name: round(float(value.detach()), 4) for name, value in task_losses.items()}
                raise TrainingError(
                    f"the training loss became {float(loss)} at step {self.state.global_step} (task losses: {losses}); "
                    "stopped before the model is saved. Lower the learning rate, check the labels' scale, or "
                    "try --max_grad_norm 1.0."
                )
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------------- logging

    def _clip_grad_norm(self, model):
        """Clip the step's gradient at `max_grad_norm` times the mean `loss_weight` of the tasks it trains (those with
        labelled rows in its micro-batches, counted over all processes by `_get_num_items_in_batch`; weight-0 tasks
        left out, and 1 where none is left).

        With separate sources a batch holds one task's rows, so one threshold for every step would undo static loss
        weights wherever a task's gradient is clipped: a task whose gradients are far above the threshold (CoSENT's
        are) would train the same whatever its weight (docs/TRAINING.md §3 has the measurement). Scaled, a weight-2
        task's clipped step is twice a weight-1 task's, as its unclipped gradient would be. A step that trains
        several tasks (a source labelled for several, or accumulation over sources) is clipped at their mean weight.
        With every weight 1 (the default) this is the Trainer's own clipping; every process clips alike."""
        step, factor = self._step_loss_weight
        factor = factor if step == self.state.global_step else 1.0
        if factor == 1.0:
            return super()._clip_grad_norm(model)
        max_grad_norm = self.args.max_grad_norm
        self.args.max_grad_norm = max_grad_norm * factor
        try:
            return super()._clip_grad_norm(model)
        finally:
            self.args.max_grad_norm = max_grad_norm

    def _reset_task_logs(self) -> None:
        device = self.args.device
        self._task_log_sums = {name: torch.zeros((), device=device) for name in self._log_names}
        self._task_log_steps = dict.fromkeys(self._log_names, 0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `loss/<task>` (mean per optimizer step that had labels for the task) and the protection term's mean
        (`loss/embedding_distillation` or `loss/l2sp`) beside the total `loss`."""
        if "loss" in logs and not any(key.startswith(("eval_", "test_")) for key in logs):
            sums = torch.stack([self._task_log_sums[name] for name in self._log_names])
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="mean")
            for index, name in enumerate(self._log_names):
                if self._task_log_steps[name] > 0:
                    logs[metric_key("loss", name)] = round(float(sums[index]) / self._task_log_steps[name], 4)
            model = unwrap(self.accelerator.unwrap_model(self.model))
            if self.args.loss_weighting == "uncertainty" and hasattr(model, "loss_weighting"):
                for name, weight in model.loss_weighting.weights().items():
                    logs[metric_key("task_weight", name)] = round(weight, 4)
            self._reset_task_logs()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------- evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        if inputs.get("labels"):
            inputs["labels"] = self._without_padding_rows(inputs["labels"], inputs["input_ids"].shape[0])
        labels = inputs.get("labels") or {}
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        loss = outputs.loss.detach() if outputs.loss is not None else None
        for name, value in (outputs.task_losses or {}).items():
            count = float(labelled_mask(labels[name]).sum())
            self._eval_sums[name] = self._eval_sums.get(name, 0.0) + float(value) * count
            self._eval_counts[name] = self._eval_counts.get(name, 0.0) + count
        if prediction_loss_only:
            return loss, None, None
        rows = inputs["input_ids"].shape[0]
        predictions = tuple(task.eval_predictions(outputs, rows) for task in self.tasks)
        references = tuple(task.eval_references(labels.get(task.name), inputs) for task in self.tasks)
        return loss, predictions, references

    def _without_padding_rows(self, labels: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """Labels with those of padding rows masked. Under DDP accelerate pads the last eval batch of every
        process with repeated rows so that all processes run the same batches, and `gather_for_metrics` keeps only
        the first `remainder` rows of what it gathers (process 0's batch first): the rows past that count in no
        metric, and masked here they count in no per-task loss either."""
        state = self.accelerator.gradient_state
        if self.args.world_size == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return labels
        real = min(rows, max(0, state.remainder - self.accelerator.process_index * rows))
        if real == rows:
            return labels
        masked = {}
        for name, tensor in labels.items():
            masked[name] = tensor.clone()
            masked[name][real:] = float("nan") if tensor.is_floating_point() else IGNORE_INDEX
        return masked

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_sums, self._eval_counts = {}, {}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        sums = torch.tensor(
            [[self._eval_sums.get(n, 0.0), self._eval_counts.get(n, 0.0)] for n in self.task_names],
            dtype=torch.float32,
            device=self.args.device,
        )
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        for index, name in enumerate(self.task_names):
            if sums[index, 1] > 0:
                output.metrics[f"{metric_key_prefix}_{metric_key(name, 'loss')}"] = float(
                    sums[index, 0] / sums[index, 1]
                )
        if self.drift is not None and metric_key_prefix == "eval":
            output.metrics.update(self._measure_drift(metric_key_prefix))
        return output

    def _measure_drift(self, prefix: str) -> dict[str, float]:
        drift = self.drift.measure(self.accelerator.unwrap_model(self.model))
        # A run with a task that trains the embedding moves it on purpose: its similarity scores say how well.
        if drift["cosine_to_initial"] < self.args.drift_warning_cosine and not self.protection.embedding_tasks:
            logger.warning(
                f"the sentence embedding has drifted: mean cosine to the initial embedding "
                f"{drift['cosine_to_initial']:.3f} < {self.args.drift_warning_cosine} (nearest-neighbour overlap "
                f"{next(v for k, v in drift.items() if k.startswith('knn')):.2f}); `encode` quality is likely down. "
                f"Keep embedding_protection='distillation' (or raise protection_weight), or add a similarity task."
            )
        return {f"{prefix}_{metric_key('embedding', key)}": value for key, value in drift.items()}

    # ------------------------------------------------------------------------------------------- optimizer

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        if self.args.head_learning_rate is None and self.args.layerwise_lr_decay in (None, 1.0):
            optimizer = super().create_optimizer(model)
        else:
            optimizer = self._grouped_optimizer(model)
        optimizer.register_step_pre_hook(self._skip_idle_parameters)
        return optimizer

    def encoder_frozen_steps(self) -> int:
        """How many of the first optimizer steps leave the shared encoder fixed (`freeze_encoder_steps`)."""
        steps = self.args.freeze_encoder_steps
        return math.ceil(steps * self.state.max_steps) if 0 < steps < 1 else int(steps)

    def _skip_idle_parameters(self, optimizer, args, kwargs) -> None:
        """Leave the heads of tasks that had no labelled row in this optimizer step (on any process) untouched, and
        the shared encoder on steps it must not learn from.

        An idle head's gradient is an exact zero (`task_loss` keeps every head in the graph, for DDP), and Adam would
        still move it: along the stale momentum, with a second moment that decays between the task's batches, so a
        head's effective step grows with the number of tasks (docs/TRAINING.md), plus weight decay on steps it has no
        data for. Dropping the gradient (`None`) makes the optimizer skip those parameters (no update, no weight
        decay, no Adam step), so each head sees the same update sequence as when trained alone. Gradients rather than
        `requires_grad`: the optimizer and DDP were built with every parameter.
        """
        base = unwrap(self.accelerator.unwrap_model(self.model))
        heads = getattr(base, "heads", None)
        for name in self._idle_tasks if heads is not None else ():
            if name in heads:
                for parameter in heads[name].parameters():
                    parameter.grad = None
        if self._encoder_idle():
            for parameter in shared_parameters(base):
                parameter.grad = None

    def _encoder_idle(self) -> bool:
        # The first `freeze_encoder_steps` train the heads alone (LP-FT); its first real step starts Adam afresh.
        if self.state.global_step < self.encoder_frozen_steps():
            return True
        # Under isolation the shared encoder learns from the embedding tasks only: idle when they all are.
        embedding_tasks = self.protection.embedding_tasks
        return self.protection.isolates and bool(embedding_tasks) and set(embedding_tasks) <= set(self._idle_tasks)

    def _grouped_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if not parameter.requires_grad:  # frozen: no optimizer state at all
                continue
            learning_rate = self.parameter_learning_rate(name, opt_model)
            weight_decay = self.args.weight_decay if name in decay_names else 0.0
            groups.setdefault((learning_rate, weight_decay), []).append(parameter)
        parameter_groups = [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(parameter_groups, **optimizer_kwargs)
        return self.optimizer

    def parameter_learning_rate(self, name: str, model: nn.Module) -> float:
        """Learning rate of one parameter: heads (with their own layers), pooling and projection vs backbone, with
        layer-wise decay. A head's own copies of the top layers learn at the head rate: they have a task to
        themselves to adapt to (docs/TRAINING.md measures the choice)."""
        base = self.args.learning_rate
        if not name.startswith("backbone."):
            return self.args.head_learning_rate if self.args.head_learning_rate is not None else base
        decay = self.args.layerwise_lr_decay
        if decay in (None, 1.0):
            return base
        num_layers = backbone_num_layers(model)
        layer = _layer_index(name)
        if layer is None:
            depth = num_layers + 1 if "embed" in name else 1  # embeddings at the bottom; final norms at the top
        else:
            depth = num_layers - layer
        return base * decay**depth


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters every task shares: the encoder, pooling and projection (not the heads, with their own layers,
    nor a learned loss weighting)."""
    return [
        parameter for name, parameter in model.named_parameters() if not name.startswith(("heads.", "loss_weighting."))
    ]


def detach_loss_weighting(model: nn.Module) -> dict[str, float] | None:
    """Remove the learned loss weighting from the model (it is a training device, not part of the model) and
    return the learned weights."""
    weighting = getattr(model, "loss_weighting", None)
    if weighting is None:
        return None
    weights = weighting.weights()
    del model.loss_weighting
    return weights
