"""The pair-task and sentence-transformers paths on a device (default cuda): a short training run of a classification
task beside a contrastive task with several positives per anchor, its retrieval evaluation (text ids made on the
device), then `encode(truncate_dim=...)`, `encode_query`, `similarity` of device tensors and pair `predict`.

    python benchmarks/gpu/check_pair_tasks.py [--device cuda] [--backbone DIR]

Part of `benchmarks/gpu/run_checks.sh`; runs on any device (`--device cpu` too). Prints what it measured; exits
non-zero on the first wrong result.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer, TrainingArguments  # noqa: E402

from modeling_mtl import MultiTaskModel  # noqa: E402
from multitask_st import default_backbone  # noqa: E402
from multitask_st.data import build_datasets, parse_task_specs  # noqa: E402
from multitask_st.trainer import MultiTaskTrainer  # noqa: E402

ANCHORS = ["how do I fix a flat bike tyre", "how do I fix a flat car tyre", "why do cats purr", "why do dogs bark"]
POSITIVES = [
    ["patch the inner tube of the bicycle", "replace the bike tube"],
    ["use the spare wheel of the car", "call roadside help for the car"],
    ["cats purr when content", "purring is how cats signal comfort"],
    ["dogs bark to warn", "barking is how dogs alert their pack"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default=None, help="default: all-MiniLM-L6-v2 (multitask_st.default_backbone)")
    args = parser.parse_args()
    if args.backbone is None:
        args.backbone = default_backbone()
    folder = Path(tempfile.mkdtemp())
    rows = [{"anchor": a, "positive": p} for a, ps in zip(ANCHORS, POSITIVES) for p in ps]
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = {split: str(folder / f"{split}.jsonl") for split in ("train", "validation")}
    default = ROOT / "multitask_st" / "default_data"
    topic = {"train": str(default / "default_train.jsonl"), "validation": str(default / "default_eval.jsonl")}
    tasks = [
        {"name": "topic", "type": "classification", "data_files": topic, "label_column": "topic",
         "max_train_samples": 64, "max_eval_samples": 32},
        {"name": "retrieval", "type": "contrastive", "data_files": files},
    ]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    data = build_datasets(parse_task_specs(tasks), tokenizer, 64)
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(args.backbone, tasks=data.model_tasks, tokenizer=tokenizer)
    training = TrainingArguments(
        output_dir=str(folder / "out"), report_to="none", max_steps=10, per_device_train_batch_size=8,
        per_device_eval_batch_size=5, learning_rate=5e-5, use_cpu=args.device == "cpu", save_strategy="no",
    )  # fmt: skip
    trainer = MultiTaskTrainer(
        model=model, args=training, train_dataset=data.train, eval_dataset=data.eval, source_sizes=data.source_sizes
    )
    trainer.train()
    output = trainer.predict(data.eval)
    ids = output.label_ids[1]
    kept = ids[:, 0] != -100
    # Rows with the same anchor share an id, and the four anchors are four queries.
    assert len(np.unique(ids[kept, 0])) == 4 and len(np.unique(ids[kept, 1])) == 8, ids[kept]
    metrics = {k: round(v, 4) for k, v in output.metrics.items() if "retrieval" in k or "topic/acc" in k}
    print("device", next(model.parameters()).device, "eval", metrics)
    assert 0.0 < metrics["test_retrieval/mrr"] <= 1.0

    model.eval()
    full = model.encode(ANCHORS, convert_to_tensor=True)
    cut = model.encode(ANCHORS, convert_to_tensor=True, truncate_dim=64, normalize_embeddings=True)
    assert cut.device == full.device and cut.shape == (4, 64)
    expected = torch.nn.functional.normalize(model.encode(ANCHORS, convert_to_tensor=True)[:, :64], dim=-1)
    assert torch.allclose(cut, expected, atol=1e-5)
    query = model.encode_query(ANCHORS, convert_to_tensor=True)
    scores = model.similarity(query, model.encode_document([p[0] for p in POSITIVES], convert_to_tensor=True))
    assert scores.device == query.device and scores.shape == (4, 4)
    best = scores.argmax(dim=1).tolist()
    pairs = model.predict([[a, p[0]] for a, p in zip(ANCHORS, POSITIVES)], tasks=["retrieval"])
    cosines = [result["retrieval"]["cosine"] for result in pairs]
    assert np.allclose(cosines, scores.diagonal().cpu().numpy(), atol=1e-4), (cosines, scores.diagonal())
    print("similarity argmax per query", best, "pair cosines", [round(c, 4) for c in cosines])
    print("all checks passed")


if __name__ == "__main__":
    main()
