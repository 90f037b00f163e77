"""The output folder of a training run: never another model's unless asked, the final save atomic (written beside,
then moved in with `config.json` last), and metrics written as strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from io_mtl import MODEL_COMMIT_FILE, commit_model_folder  # noqa: F401  (commit_model_folder: re-exported)

from .errors import TrainingError
from .lora import save_lora_adapter
from .model_card import write_model_card

STAGING_DIR = ".final-model-staging"


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
        write_json(staging / "metrics.json", metrics)
        write_json(staging / "training_config.json", record)
        if (output_dir / "trainer_state.json").is_file():
            shutil.copy(output_dir / "trainer_state.json", staging / "trainer_state.json")
        write_model_card(staging, name=output_dir.resolve().name)
        commit_model_folder(staging, output_dir)
    return output_dir
