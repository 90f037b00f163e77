"""Multi-task vs single-task vs frozen-backbone training on real data (SST-2, TREC coarse, WikiANN-en).

    python benchmarks/bench_multitask_training.py --data_dir ../shared/data [--train_samples 4000 --steps 600]

Runs `train.py` (in this process) for:
- `multitask`: one model, three heads, `--steps` optimizer steps with temperature sampling over the three datasets;
- `single-<task>`: one model per task, `--steps / 3` steps each (the same number of training examples per task as
  the multi-task run sees on average, and the same total compute);
- `frozen`: the multi-task setup with the encoder frozen (heads only).
Each model is scored on the test splits; the script writes a table to outputs/multitask_training.md (or --results)
with the exact command, the hardware, training time, parameter counts and inference cost (one encoder pass for all
tasks vs one per single-task model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = {
    "sentiment": {
        "type": "classification",
        "folder": "sst2",
        "text_column": "sentence",
        "label_column": "label",
        "labels": ["negative", "positive"],
        "train_split": "train",
        "eval_split": "validation",
        "test_split": "test",
        "metric": ("accuracy", "SST-2 acc"),
    },
    "question_type": {
        "type": "classification",
        "folder": "trec",
        "text_column": "text",
        "label_column": "coarse_label",
        "train_split": "train[:-500]",
        "eval_split": "train[-500:]",
        "test_split": "test",
        "metric": ("accuracy", "TREC acc"),
    },
    "ner": {
        "type": "token_classification",
        "folder": "wikiann-en",
        "tokens_column": "tokens",
        "tags_column": "ner_tags",
        "train_split": "train",
        "eval_split": "validation",
        "test_split": "test",
        "metric": ("f1", "WikiANN F1"),
    },
}


def task_specs(data_dir: Path, names: list[str], train_samples: int, eval_samples: int, test_samples: int) -> list:
    specs = []
    for name in names:
        task = {key: value for key, value in TASKS[name].items() if key not in ("folder", "metric")}
        specs.append(
            {
                "name": name,
                "dataset": str(data_dir / TASKS[name]["folder"]),
                **task,
                "max_train_samples": train_samples,
                "max_eval_samples": eval_samples,
                "max_test_samples": test_samples,
            }
        )
    return specs


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return (
        f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch threads: "
        f"{torch.get_num_threads()}), no GPU"
    )


def run_training(
    name: str, tasks: list, output_root: Path, steps: int, args, extra: list[str], callbacks: list | None = None
) -> dict:
    """One `train.py` run in this process. The embedding protection is off: the figures these benchmarks recorded
    (docs/RESULTS.md's budgets, docs/TRAINING_CHOICES.md) measure the heads alone, as before the protection existed;
    `benchmarks/bench_embedding_protection.py` measures it."""
    import train

    output = output_root / name
    argv = [
        "--tasks",
        json.dumps(tasks),
        "--output_dir",
        str(output),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--per_device_eval_batch_size",
        "128",
        "--max_seq_length",
        str(args.max_seq_length),
        "--learning_rate",
        str(args.learning_rate),
        "--head_learning_rate",
        str(args.head_learning_rate),
        "--warmup_steps",
        "0.1",
        "--weight_decay",
        "0.01",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        "50",
        "--report_to",
        "none",
        "--seed",
        str(args.seed),
        "--num_examples_to_print",
        "0",
        "--dataloader_num_workers",
        "0",
        "--embedding_protection",
        "none",
        "--overwrite_output_dir",
        "true",
        *extra,
    ]
    if args.model_name_or_path:
        argv += ["--model_name_or_path", args.model_name_or_path]
    started = time.time()
    assert train.main(argv, callbacks=callbacks) == 0, f"run {name} failed"
    wall = time.time() - started
    metrics = json.loads((output / "metrics.json").read_text())
    config = json.loads((output / "training_config.json").read_text())
    return {
        "name": name,
        "output": str(output),
        "metrics": metrics,
        "train_runtime_s": config["train_runtime_s"],
        "wall_s": wall,
        "hardware": config["hardware"],
    }


def parameter_counts(output: str) -> tuple[int, int]:
    from modeling_mtl import MultiTaskModel

    model = MultiTaskModel.from_pretrained(output)
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    return total, total - backbone


def inference_cost(outputs: list[str], sentences: list[str]) -> float:
    """Seconds to predict every task of the given models on `sentences` (one model = one encoder pass)."""
    import torch

    from modeling_mtl import MultiTaskModel

    models = [MultiTaskModel.from_pretrained(output) for output in outputs]
    for model in models:
        model.predict(sentences[:32], batch_size=64)  # warm-up
    with torch.inference_mode():
        started = time.perf_counter()
        for model in models:
            model.predict(sentences, batch_size=64)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("MTL_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--output_root", default=str(ROOT / "outputs" / "bench_multitask_training"))
    parser.add_argument("--results", default=str(ROOT / "outputs" / "multitask_training.md"))  # never over the docs
    parser.add_argument("--model_name_or_path", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--train_samples", type=int, default=4000, help="training rows kept per task")
    parser.add_argument("--eval_samples", type=int, default=500)
    parser.add_argument("--test_samples", type=int, default=2000, help="test rows kept per task (SST-2 has 1,821)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of the multi-task run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--head_learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", default="multitask,single,frozen", help="comma list of multitask,single,frozen")
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir)
    if not (data_dir / "sst2").is_dir():
        print(f"real data not found at {data_dir} (pass --data_dir or set MTL_SHARED_DATA)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_root = Path(args.output_root)
    names = list(TASKS)
    all_tasks = task_specs(data_dir, names, args.train_samples, args.eval_samples, args.test_samples)
    runs = args.runs.split(",")
    results = []
    if "multitask" in runs:
        results.append(run_training("multitask", all_tasks, output_root, args.steps, args, []))
    if "single" in runs:
        for name in names:
            single = task_specs(data_dir, [name], args.train_samples, args.eval_samples, args.test_samples)
            results.append(run_training(f"single-{name}", single, output_root, args.steps // len(names), args, []))
    if "frozen" in runs:
        results.append(run_training("frozen", all_tasks, output_root, args.steps, args, ["--freeze_backbone", "true"]))

    import datasets

    sentences = datasets.load_dataset("json", data_files=str(data_dir / "sst2" / "test.jsonl"), split="train")
    sentences = sentences["sentence"][:512]
    rows = []
    singles = [r for r in results if r["name"].startswith("single-")]
    for result in results:
        if result["name"].startswith("single-"):
            continue
        total, heads = parameter_counts(result["output"])
        rows.append((result, total, heads, inference_cost([result["output"]], sentences)))
    if singles:
        combined = {
            "name": "single-task x3",
            "metrics": {"test": {}},
            "train_runtime_s": 0.0,
            "hardware": singles[0]["hardware"],
        }
        total = heads = 0
        for single in singles:
            combined["metrics"]["test"].update(single["metrics"]["test"])
            combined["train_runtime_s"] += single["train_runtime_s"]
            count, head_count = parameter_counts(single["output"])
            total, heads = total + count, heads + head_count
        rows.append((combined, total, heads, inference_cost([s["output"] for s in singles], sentences)))

    command = "python benchmarks/bench_multitask_training.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    lines = [
        "# Multi-task training results",
        "",
        "Written by `benchmarks/bench_multitask_training.py`. Exact command:",
        "",
        f"    {command}",
        "",
        f"Hardware: {hardware()}. Shared with other jobs while it ran, so times are indicative.",
        f"Every row below came from this hardware ({rows[0][0]['hardware'] if rows else '-'}).",
        "",
        f"Budget (a CPU-sized subsample, not the full datasets): {args.train_samples} training rows per task "
        f"(seeded random subset), max_seq_length {args.max_seq_length}, batch {args.batch_size}, "
        f"multi-task and frozen runs {args.steps} optimizer steps (temperature sampling, T=2), each single-task "
        f"model {args.steps // len(names)} steps (same examples per task, same total steps). "
        f"lr {args.learning_rate} (encoder), {args.head_learning_rate} (heads), linear decay, 10% warm-up. "
        f"Test sets: SST-2 test ({min(1821, args.test_samples)} of 1,821), TREC test ({min(500, args.test_samples)} "
        f"of 500), WikiANN-en test ({min(10000, args.test_samples)} of 10,000, seeded random subset). TREC has no "
        "validation split: the last 500 training rows are held out for it (and not used for training).",
        "",
        "| model | SST-2 acc | TREC acc | WikiANN F1 | mean | train time (s) | params (heads) | "
        "inference, 512 sentences, all 3 tasks (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result, total, heads, seconds in rows:
        test = result["metrics"].get("test", {})
        scores = [test.get(name, {}).get(TASKS[name]["metric"][0]) for name in names]
        shown = [f"{100 * s:.2f}" if s is not None else "-" for s in scores]
        mean = f"{100 * sum(scores) / len(scores):.2f}" if all(s is not None for s in scores) else "-"
        lines.append(
            f"| {result['name']} | {' | '.join(shown)} | {mean} | {result['train_runtime_s']:.0f} | "
            f"{total / 1e6:.2f}M ({heads / 1e3:.1f}k) | {seconds:.2f} |"
        )
    lines += [
        "",
        "Scores are percentages on the test splits. `single-task x3` is three separate models (three encoder",
        "passes at inference, three times the parameters); the multi-task model serves all three tasks from one",
        "encoder pass. `frozen` trains only the heads on top of the pretrained all-MiniLM-L6-v2 encoder.",
        "",
        "Raw per-run metrics: "
        + ", ".join(f"`{Path(r['output']).name}/metrics.json`" for r in results)
        + f" under `{output_root}`.",
        "",
    ]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
