"""Render the figures of docs/RESULTS.md from the figures its tables hold (nothing is trained or measured here).

    python scripts/make_results_figures.py [--output-dir docs/figures]

Every number below is copied from a table of docs/RESULTS.md, named in the comment above it; change the table and
the number here together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASE_STSB = 82.03  # the untrained all-MiniLM-L6-v2, STS-B test Spearman x100 (every table's "base model" row)

# RESULTS.md, "4. Protections compared", its table (CPU, 3 seeds, the test side of each head column):
# (label, STS-B test mean, std, SST-2 acc, TREC acc, WikiANN F1)
PROTECTIONS = [
    ("distillation, weight 3 (the recipe)", 82.15, 0.10, 85.92, 96.00, 65.41),
    ("distillation, weight 2", 82.10, 0.15, 85.37, 95.80, 65.53),
    ("no protection", 81.03, 0.38, 85.78, 96.07, 66.72),
    ("L2-SP, weight 0.01", 81.29, 0.24, 85.61, 95.73, 65.80),
    ("LoRA rank 8, no protection term", 81.22, 0.16, 83.80, 96.00, 64.76),
    ("frozen encoder (isolation, weight 1)", 82.03, 0.00, 83.60, 94.60, 60.97),
]
# the same table, row "single-task models" (test): SST-2, TREC, WikiANN
SINGLE_TASK = (85.78, 96.07, 66.01)

# RESULTS.md, "3. Tasks that train the embedding", first table (CPU, 3 seeds): (label, STS-B test mean, std, current)
EMBEDDING_TASKS = [
    ("base model (untrained)", 82.03, 0.00, True),
    ("3 heads, distillation (the recipe)", 82.15, 0.10, True),
    ("MRPC pair classification alone", 81.39, 0.50, True),
    ("MRPC retrieval alone", 83.12, 0.20, True),
    ("3 heads + STS-B, distillation w10 (one own layer)", 82.89, 0.16, False),
    ("6 tasks, equal loss weights", 84.34, 0.37, True),
    ("6 tasks, STS-B loss_weight 2", 85.21, 0.18, True),
    ("3 heads + STS-B, heads fully isolated", 86.11, 0.28, True),
    ("3 heads + STS-B (the recipe: isolation 0.9)", 86.27, 0.50, True),
    ("STS-B alone", 86.50, 0.21, True),
]

# RESULTS.md, "2. Heads against single-task models" (recipe minus single-task model, points):
# (label, (SST-2, TREC, WikiANN) on validation, the same on test)
HEAD_GAPS = [
    ("CPU, 5 seeds", (0.44, -0.36, -0.41), (-0.05, -0.36, -0.38)),
    ("H100, 11 seeds", (0.65, 0.13, -0.73), (0.23, -0.51, -0.91)),
    ("CPU, 3 seeds, beside STS-B", (-1.27, -0.14, -1.07), (-1.12, -0.54, -0.59)),
]
HEADS = ("SST-2 acc", "TREC acc", "WikiANN F1")


def protections_figure(plt, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    markers = "o^sDvP"
    for column, (ax, head) in enumerate(zip(axes, HEADS)):
        single = SINGLE_TASK[column]
        ax.axhspan(single - 1, single + 1, color="0.9", zorder=0)
        ax.axhline(single, color="0.4", linestyle="--", linewidth=1)
        ax.axvline(BASE_STSB, color="0.4", linestyle=":", linewidth=1)
        for (label, stsb, std, *scores), marker in zip(PROTECTIONS, markers):
            ax.errorbar(stsb, scores[column], xerr=std, fmt=marker, markersize=7, capsize=3, label=label)
        ax.set_title(f"{head} (test)")
        ax.set_xlabel("STS-B test Spearman (encode)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("head score, test")
    axes[0].annotate("single-task model ± 1", xy=(0.02, 0.93), xycoords="axes fraction", fontsize=8, color="0.3")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        "Protections: STS-B kept (dotted: the base model's) against each head (dashed: its single-task model)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.13, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def embedding_tasks_figure(plt, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    labels = [row[0] for row in EMBEDDING_TASKS]
    y = range(len(EMBEDDING_TASKS))
    colors = ["tab:blue" if row[3] else "0.75" for row in EMBEDDING_TASKS]
    ax.barh(y, [row[1] for row in EMBEDDING_TASKS], xerr=[row[2] for row in EMBEDDING_TASKS], color=colors, capsize=3)
    for position, row in zip(y, EMBEDDING_TASKS):
        ax.text(row[1] + row[2] + 0.1, position, f"{row[1]:.2f}", va="center", fontsize=8)
    ax.axvline(BASE_STSB, color="0.4", linestyle=":", linewidth=1)
    ax.axvline(85, color="tab:red", linestyle="--", linewidth=1)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlim(80, 87.5)
    ax.set_xlabel("STS-B test Spearman (encode), mean ± std over 3 seeds, CPU")
    ax.set_title("STS-B from the tasks that train the embedding (red: 85; grey: an older recipe)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def head_gaps_figure(plt, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    width = 0.8 / len(HEAD_GAPS)
    for ax, split, index in zip(axes, ("validation", "test"), (1, 2)):
        ax.axhspan(-1, 1, color="0.92", zorder=0)
        ax.axhline(0, color="0.4", linewidth=1)
        for offset, row in enumerate(HEAD_GAPS):
            xs = [head + (offset - (len(HEAD_GAPS) - 1) / 2) * width for head in range(len(HEADS))]
            ax.bar(xs, row[index], width=width, label=row[0])
        ax.set_xticks(range(len(HEADS)), HEADS)
        ax.set_title(split, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("recipe − single-task model (points)")
    axes[0].set_ylim(-1.6, 1.0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Each head against a model trained for its task alone (grey band: ±1 point)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for name, draw in (
        ("results_protections.png", protections_figure),
        ("results_embedding_tasks.png", embedding_tasks_figure),
        ("results_head_gaps.png", head_gaps_figure),
    ):
        draw(plt, output / name)
        print(f"wrote {output / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
