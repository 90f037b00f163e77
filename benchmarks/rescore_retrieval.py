"""MRPC paraphrase retrieval of saved `bench_embedding_protection.py` models, scored both ways: per row (the metric
until 2026-11-27: each row's anchor against every row's positive, its own row's the one relevant) and per distinct
query (the metric now, `multitask_st.metrics`). Tells how far the MRR figures recorded before the change move.

    python benchmarks/rescore_retrieval.py outputs/probe-hl2/heads+sts+mrpc-seed{0,1,2} --data_dir ../shared/data

Each folder holds `model/` and `bench_result.json`; the splits are the bench's (validation: the paraphrases among
MRPC train's last 400 rows; test: MRPC test's paraphrases). Embeddings come from `encode`, so the per-row figure
reproduces the recorded one to float precision, not bit for bit.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modeling_mtl import MultiTaskModel  # noqa: E402
from multitask_st.metrics import retrieval_text_ids, task_metrics  # noqa: E402


def paraphrases(data_dir: Path, split: str) -> list[dict]:
    rows = [
        json.loads(line)
        for line in (data_dir / "mrpc" / f"{'train' if split == 'validation' else 'test'}.jsonl").open()
    ]
    rows = rows[-400:] if split == "validation" else rows
    return [row for row in rows if row["label"] == 1]


def per_row(anchors: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    scores = anchors @ positives.T
    ranks = 1 + (scores > np.diag(scores)[:, None]).sum(1)
    return {"mrr": float((1 / ranks).mean()), "recall_at_1": float((ranks == 1).mean())}


def text_ids(model: MultiTaskModel, texts: list[str]) -> np.ndarray:
    tokens = model.tokenize(texts)
    return retrieval_text_ids(tokens["input_ids"], tokens["attention_mask"]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    task = {"name": "mrpc_retrieval", "type": "contrastive", "labels": []}
    for folder in args.folders:
        model = MultiTaskModel.from_pretrained(folder / "model").eval()
        recorded = json.loads((folder / "bench_result.json").read_text())
        for split in ("validation", "test"):
            rows = paraphrases(args.data_dir, split)
            texts = [[row["sentence1"] for row in rows], [row["sentence2"] for row in rows]]
            with torch.inference_mode():
                anchors, positives = (model.encode(side, normalize=True) for side in texts)
            now = task_metrics(
                task, np.stack([anchors, positives], 1), np.stack([text_ids(model, side) for side in texts], 1)
            )
            before, kept = per_row(anchors, positives), recorded[split].get("mrpc_retrieval", {})
            print(
                f"{folder.name} {split}: recorded MRR {100 * kept.get('mrr', float('nan')):.2f}; per row "
                f"{100 * before['mrr']:.2f} (recall@1 {100 * before['recall_at_1']:.2f}); per query "
                f"{100 * now['mrr']:.2f} (recall@1 {100 * now['recall_at_1']:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
