"""Checkpoints of a training run: which one is complete (a run killed while saving leaves a partial one, a full disk
a truncated file), and whether a checkpoint can be resumed by this run (same tasks, labels, heads, loss weighting and
embedding protection), so that a resumed run never reads weights or optimizer state that mean something else.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from io_mtl import check_safetensors

from .errors import FileError, TrainingError
from .lora import LORA_CONFIG_FILE, unwrap

logger = logging.get_logger(__name__)

PROTECTION_FILE = "embedding_protection.json"  # in every checkpoint: the protection the run trained with


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


def damaged_file(checkpoint: str | os.PathLike) -> str | None:
    """The first file of `checkpoint` that is truncated or not what its name says (`None`: all are whole), as a
    sentence naming it. A complete checkpoint can still hold one (a full disk, a copy cut short), and resuming from
    it would fail deep inside the Trainer, or load garbage."""
    folder = Path(checkpoint)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors(str(path))
        except FileError as error:
            return str(error)
    for path in sorted([*folder.glob("*.pt"), *folder.glob("*.pth"), *folder.glob("*.bin")]):
        if not zipfile.is_zipfile(path):  # `torch.save` writes a zip archive, its directory at the end
            return f"{path} is truncated or not a PyTorch file"
    return None


def check_checkpoint_files(checkpoint: str | os.PathLike) -> None:
    """Refuse to resume from a checkpoint with a damaged file, naming it."""
    problem = damaged_file(checkpoint)
    if problem:
        raise TrainingError(
            f"cannot resume from {checkpoint}: {problem}. Resume from an earlier checkpoint, or start a new run"
        )


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest `checkpoint-<step>` of `output_dir` that was completely written and holds no damaged file. A run
    killed while writing a checkpoint leaves a partial one behind, and a full disk a truncated file: such a checkpoint
    is skipped with a warning naming why, and the run resumes from the one before (a few steps lost, rather than a
    run that cannot resume at all)."""
    folder = Path(output_dir)
    candidates = sorted(
        (path for path in folder.glob("checkpoint-*") if path.is_dir() and path.name.split("-")[-1].isdigit()),
        key=lambda path: int(path.name.split("-")[-1]),
        reverse=True,
    )
    for path in candidates:
        if not is_complete_checkpoint(path):
            logger.warning(f"skipping {path}: an incompletely written checkpoint (the run was killed while saving it)")
        elif problem := damaged_file(path):
            logger.warning(f"skipping {path}: {problem}")
        else:
            return str(path)
    raise TrainingError(f"--resume_from_checkpoint true: no complete checkpoint in {folder}")


def check_resumable(
    checkpoint: str | os.PathLike,
    model: torch.nn.Module,
    loss_weighting: str,
    protection: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume a checkpoint trained with other tasks, labels, heads, loss weighting or embedding protection:
    its head weights would silently mean something else, or its optimizer state would not fit (the protection decides
    which parameters train). The message names every difference. A checkpoint with a damaged file is refused first,
    naming the file."""
    check_checkpoint_files(checkpoint)
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
