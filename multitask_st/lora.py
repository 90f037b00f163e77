"""LoRA on the shared encoder (PEFT): wrap a model so that only low-rank adapters of the encoder train (with every
head, the pooling and the projection), save the adapters with the model config they belong to, and rebuild the
model from them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from configuration_mtl import MultiTaskConfig
from modeling_mtl import MultiTaskModel
from validation_mtl import InputError, check_int

LORA_CONFIG_FILE = "multitask_config.json"  # the MultiTaskConfig beside a LoRA adapter (adapter_config.json is PEFT's)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The `MultiTaskModel` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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

    check_int("lora_rank", rank, 1)
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
    to, so that `load_lora_model` can rebuild it from the base encoder (recorded as PEFT's `base_model_name_or_path`,
    which PEFT leaves empty for a model it did not load itself)."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = config.base_model_name_or_path or unwrap(model).backbone.config.name_or_path
    model.save_pretrained(str(directory))
    model.get_base_model().config.to_json_file(str(Path(directory) / LORA_CONFIG_FILE))


def load_lora_model(directory: str | os.PathLike, base_model: str | None = None, merge: bool = False):
    """Rebuild a model saved by `save_lora_adapter`: the base encoder (`base_model`, default the one recorded in the
    adapter) with the saved tasks, then the adapters and heads. `merge=True` folds the adapters into the encoder and
    returns a plain `MultiTaskModel`."""
    from peft import PeftModel

    directory = Path(directory)
    config = MultiTaskConfig.from_json_file(str(directory / LORA_CONFIG_FILE))
    adapter = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    base = base_model or adapter.get("base_model_name_or_path") or config.backbone_config.name_or_path
    if not base:
        raise InputError(f"{directory}/adapter_config.json names no base model: give load_lora_model(base_model=...)")
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
        raise InputError("the backbone has no nn.Linear layers to put LoRA adapters on; give lora_target_modules")
    return sorted(names)
