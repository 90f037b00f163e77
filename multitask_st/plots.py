"""Pictures: a sentence-similarity heatmap and training curves from a Trainer log."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from validation_mtl import InputError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def similarity_heatmap(
    scores: np.ndarray,
    sentences: Sequence[str],
    path: str | os.PathLike,
    columns: Sequence[str] | None = None,
    title: str = "Cosine similarity",
    wrap: int = 40,
) -> Path:
    """Save a heatmap of a similarity matrix with the sentences as tick labels.

    Args:
        scores: `(len(sentences), len(columns))` matrix.
        sentences: row labels (and column labels when `columns` is None).
        path: PNG file to write (parent folders are created).
        columns: column labels, when they differ from the rows.
        title: figure title.
        wrap: tick labels are wrapped at this many characters.
    """
    scores = np.asarray(scores, dtype=float)
    columns = list(sentences) if columns is None else list(columns)
    if scores.shape != (len(sentences), len(columns)):
        raise ValueError(f"scores has shape {scores.shape}, expected {(len(sentences), len(columns))}")
    plt = _pyplot()
    size = max(5.0, 0.9 * max(scores.shape) + 3)
    fig, ax = plt.subplots(figsize=(size + 2, size))
    image = ax.imshow(scores, cmap="viridis", vmin=min(0.0, scores.min()), vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(
        range(len(columns)),
        [textwrap.shorten(c, wrap * 2, placeholder="…") for c in columns],
        rotation=45,
        ha="right",
        fontsize=8,
    )
    ax.set_yticks(range(len(sentences)), ["\n".join(textwrap.wrap(s, wrap)) or " " for s in sentences], fontsize=8)
    for row in range(scores.shape[0]):
        for col in range(scores.shape[1]):
            value = scores[row, col]
            ax.text(
                col,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if value > 0.6 else "white",
            )
    ax.set_title(title)
    return _save(fig, path)


def training_curves(trainer_state: str | os.PathLike | dict, path: str | os.PathLike) -> Path:
    """Plot training loss, per-task losses and eval metrics from a `trainer_state.json` log history.

    Args:
        trainer_state: the path of `trainer_state.json` (or of the training output folder), or its loaded dict.
        path: PNG file to write.
    """
    if not isinstance(trainer_state, dict):
        state_path = Path(trainer_state)
        if state_path.is_dir():
            state_path = state_path / "trainer_state.json"
        if not state_path.is_file():
            raise FileNotFoundError(f"no trainer_state.json at {state_path}")
        trainer_state = json.loads(state_path.read_text())
    history = trainer_state.get("log_history") or []
    if not history:
        raise InputError("trainer_state has an empty log_history: nothing to plot")

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(entry.get("step", 0), entry[key]) for entry in history if isinstance(entry.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({key for entry in history for key in entry})
    loss_keys = [
        k for k in keys if k == "loss" or k.startswith("loss_") or (k.startswith("eval_") and k.endswith("loss"))
    ]
    skip = ("runtime", "per_second", "epoch", "loss", "combined")
    metric_keys = [k for k in keys if k.startswith("eval_") and not any(s in k for s in skip)]
    metric_keys += [k for k in keys if k == "eval_combined_score"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if metric_keys else 1, figsize=(12 if metric_keys else 6.5, 4.5), squeeze=False)
    for key in loss_keys:
        steps, values = series(key)
        if steps:
            axes[0, 0].plot(steps, values, marker="o" if key.startswith("eval_") else None, markersize=3, label=key)
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].set_title("Losses")
    axes[0, 0].legend(fontsize=7)
    if metric_keys:
        for key in metric_keys:
            steps, values = series(key)
            if steps:
                axes[0, 1].plot(steps, values, marker="o", markersize=3, label=key.removeprefix("eval_"))
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_title("Evaluation metrics")
        axes[0, 1].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG (creating the folder) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
