"""Compare pooling modes on a frozen all-MiniLM-L6-v2: STS-B cosine Spearman and linear-probe accuracy.

    python benchmarks/bench_pooling.py --data_dir ../shared/data [--probe_train 2000]

The encoder runs once per batch and every pooling mode reads the same token states, so the comparison isolates
pooling. The learned `attention` mode is left out: untrained, its scorer is random. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from modeling_mtl import MultiTaskModel, Pooling
from multitask_st import default_backbone

MODES = ("mean", "cls", "max", "mean_sqrt_len", "weighted_mean", "last_token")


def read_jsonl(path: Path, limit: int | None = None, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    if limit is not None and len(rows) > limit:
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:limit]]
    return rows


@torch.inference_mode()
def embed_all_modes(model: MultiTaskModel, texts: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    poolers = {mode: Pooling(mode, model.config.hidden_size) for mode in MODES}
    out = {mode: np.zeros((len(texts), model.config.hidden_size), dtype=np.float32) for mode in MODES}
    order = np.argsort([-len(t) for t in texts], kind="stable")
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = model.tokenize([texts[i] for i in idx], return_token_type_ids=False)
        states = model.backbone(**batch).last_hidden_state
        for mode, pooler in poolers.items():
            out[mode][idx] = pooler(states, batch["attention_mask"]).numpy()
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--probe_train", type=int, default=2000, help="training sentences per probe task")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(default_backbone()).eval()

    start = time.perf_counter()
    sts = read_jsonl(args.data_dir / "stsb" / "test.jsonl")
    left = embed_all_modes(model, [r["sentence1"] for r in sts])
    right = embed_all_modes(model, [r["sentence2"] for r in sts])
    gold = [r["score"] for r in sts]

    probes = {
        "SST-2 (validation)": (
            read_jsonl(args.data_dir / "sst2" / "train.jsonl", args.probe_train),
            read_jsonl(args.data_dir / "sst2" / "validation.jsonl"),
            "sentence",
            "label",
        ),
        "TREC-6 (test)": (
            read_jsonl(args.data_dir / "trec" / "train.jsonl", args.probe_train),
            read_jsonl(args.data_dir / "trec" / "test.jsonl"),
            "text",
            "coarse_label",
        ),
    }
    probe_embeddings = {
        name: (
            embed_all_modes(model, [r[text] for r in train]),
            embed_all_modes(model, [r[text] for r in test]),
            [r[label] for r in train],
            [r[label] for r in test],
        )
        for name, (train, test, text, label) in probes.items()
    }

    rows = []
    for mode in MODES:
        cosine = (unit(left[mode]) * unit(right[mode])).sum(axis=1)
        row = {"pooling": mode, "STS-B test Spearman": 100 * spearmanr(cosine, gold).statistic}
        for name, (train_x, test_x, train_y, test_y) in probe_embeddings.items():
            probe = LogisticRegression(max_iter=2000, C=1.0).fit(unit(train_x[mode]), train_y)
            row[f"{name} probe acc"] = 100 * probe.score(unit(test_x[mode]), test_y)
        rows.append(row)
    elapsed = time.perf_counter() - start

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(row[c] if isinstance(row[c], str) else f"{row[c]:.2f}" for c in columns) + " |")
    table = "\n".join(lines)
    note = (
        f"all-MiniLM-L6-v2, frozen, no fine-tuning; probes: logistic regression on L2-normalised embeddings, "
        f"{args.probe_train} training sentences per task (seed 0); {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {elapsed:.0f} s"
    )
    print(table)
    print(note)
    if args.output:
        args.output.write_text(table + "\n\n" + note + "\n")


if __name__ == "__main__":
    main()
