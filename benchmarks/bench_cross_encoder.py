"""The `cross_encoder` task type on real pairs: against the bi-encoder pair tasks and against sentence-transformers'
`CrossEncoder` trained the same way (same data, epochs, batch size, learning rate, schedule, maximum length and
seed), on STS-B (a score per pair) and MRPC (a label per pair).

    python benchmarks/bench_cross_encoder.py --data_dir ../shared/data --seeds 0 1 2

Configurations (`--configs`; each on `--datasets` stsb and mrpc), all from the bundled all-MiniLM-L6-v2:
- `cross`: this project, one `cross_encoder` task, `train.py`'s recipe (the head's own attention pooling over its
  own copies of the top two layers; the embedding kept by distillation, the default with no embedding task);
- `cross-plain`: the same task with a linear head on the shared pooled vector and no protection (the nearest to a
  `CrossEncoder`, which fine-tunes everything and reads a pooled [CLS]);
- `bi`: this project's bi-encoder task for the data (`similarity` on STS-B, `pair_classification` on MRPC);
- `cross+bi`: both tasks in one model from the same rows (one checkpoint: embeddings, reranker, classifier);
- `st-cross`: `sentence_transformers.CrossEncoder` (num_labels 1 and `BinaryCrossEntropyLoss` on scores mapped to
  [0, 1] for STS-B; num_labels 2 and `CrossEntropyLoss` for MRPC), trained by its `CrossEncoderTrainer`.
Scores: STS-B Spearman x100 of the predicted score (a cross-encoder's sigmoid, a bi-encoder's cosine); MRPC accuracy
and macro-F1 x100; on validation (STS-B validation, MRPC's last 400 training pairs) and test, test scored once after
training; and, for this project's models, STS-B test Spearman of `encode` cosines (the embedding: what training left
of the base model's, whose score docs/RESULTS.md gives). Every run is a subprocess (its own memory and threads);
results are cached per (dataset, config, seed) in `--output_root` and written to `--results_json`; the table is
printed as mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("cross", "cross-plain", "bi", "cross+bi", "st-cross")
DATASETS = {
    "stsb": {
        "folder": "stsb",
        "label_column": "score",
        "score_range": [0, 5],
        "train_split": "train",
        "eval_split": "validation",
        "test_split": "test",
        "bi": "similarity",
    },
    "mrpc": {
        "folder": "mrpc",
        "label_column": "label",
        "labels": ["not_equivalent", "equivalent"],
        "train_split": "train[:-400]",
        "eval_split": "train[-400:]",
        "test_split": "test",
        "bi": "pair_classification",
    },
}


def task_specs(dataset: str, data_dir: Path, config: str) -> list[dict]:
    info = DATASETS[dataset]
    common = {
        "dataset": str(data_dir / info["folder"]),
        "label_column": info["label_column"],
        "train_split": info["train_split"],
        "eval_split": info["eval_split"],
        "test_split": info["test_split"],
        "text_column": "sentence1",
        "text_pair_column": "sentence2",
    }
    options = {"score_range": info["score_range"]} if dataset == "stsb" else {"labels": info["labels"]}
    cross = {"name": f"{dataset}_cross", "type": "cross_encoder", **common, **options}
    bi = {"name": f"{dataset}_bi", "type": info["bi"], **common, **options}
    return {"cross": [cross], "cross-plain": [cross], "bi": [bi], "cross+bi": [cross, bi]}[config]


def primary(dataset: str) -> str:
    return "spearman" if dataset == "stsb" else "accuracy"


# ---------------------------------------------------------------------------------------------- one run


def run_ours(dataset: str, config: str, seed: int, args, folder: Path) -> dict:
    job = {
        "tasks": task_specs(dataset, Path(args.data_dir).resolve(), config),
        "output_dir": str(folder),
        "model_name_or_path": default_backbone(),
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": 64,
        "learning_rate": args.learning_rate,
        "max_seq_length": args.max_seq_length,
        "seed": seed,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 50,
        "num_examples_to_print": 0,
        "overwrite_output_dir": True,
    }
    if config == "cross-plain":
        job.update(head_pooling="shared", head_layers=0, embedding_protection="none")
    path = folder.parent / f"{folder.name}.json"
    path.write_text(json.dumps(job, indent=2))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), str(path)], check=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    metrics = json.loads((folder / "metrics.json").read_text())
    result = {"seconds": seconds, "embedding_stsb_test": embedding_stsb(folder, Path(args.data_dir))}
    for name in (task["name"] for task in job["tasks"]):
        kind = "cross" if name.endswith("_cross") else "bi"
        for split in ("eval", "test"):
            scores = metrics[split][name]
            result[f"{kind}_{split}"] = 100 * scores[primary(dataset)]
            if dataset == "mrpc":
                result[f"{kind}_{split}_macro_f1"] = 100 * scores["macro_f1"]
    return result


def embedding_stsb(folder: Path, data_dir: Path) -> float:
    """STS-B test Spearman x100 of the model's `encode` cosines: what training left of the embedding."""
    from scipy.stats import spearmanr

    from modeling_mtl import MultiTaskModel

    rows = [json.loads(line) for line in (data_dir / "stsb" / "test.jsonl").read_text().splitlines() if line]
    model = MultiTaskModel.from_pretrained(folder).eval()
    cosines = model.similarity([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], pairwise=True)
    return 100 * float(spearmanr(cosines, [r["score"] for r in rows]).statistic)


def run_sentence_transformers(dataset: str, seed: int, args, folder: Path) -> dict:
    """`CrossEncoder` from the same checkpoint, trained by its own trainer with the same hyperparameters."""
    import torch
    from datasets import Dataset, load_dataset
    from scipy.stats import spearmanr
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, CrossEntropyLoss
    from transformers import set_seed

    info = DATASETS[dataset]
    files = {"train": str(Path(args.data_dir).resolve() / info["folder"] / "train.jsonl")}
    if dataset == "stsb":
        files.update(validation=files["train"].replace("train.jsonl", "validation.jsonl"))
    files["test"] = files["train"].replace("train.jsonl", "test.jsonl")
    splits = {
        key: load_dataset("json", data_files=files, split=info[f"{key}_split"]) for key in ("train", "eval", "test")
    }
    set_seed(seed)
    stsb = dataset == "stsb"
    model = CrossEncoder(default_backbone(), num_labels=1 if stsb else 2, max_length=args.max_seq_length)
    label = (lambda row: row["score"] / 5.0) if stsb else (lambda row: int(row["label"]))
    train = Dataset.from_dict(
        {
            "sentence1": splits["train"]["sentence1"],
            "sentence2": splits["train"]["sentence2"],
            "label": [label(row) for row in splits["train"]],
        }
    )
    training_args = CrossEncoderTrainingArguments(
        output_dir=str(folder),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=0.1,  # the recipe's (train.py RECIPE): a share of the steps
        weight_decay=0.01,
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False,
    )
    loss = BinaryCrossEntropyLoss(model) if stsb else CrossEntropyLoss(model)
    started = time.perf_counter()
    CrossEncoderTrainer(model=model, args=training_args, train_dataset=train, loss=loss).train()
    result = {"seconds": time.perf_counter() - started}
    for split in ("eval", "test"):
        rows = splits[split]
        pairs = list(zip(rows["sentence1"], rows["sentence2"]))
        predictions = model.predict(pairs, batch_size=64, show_progress_bar=False)
        if stsb:
            result[f"cross_{split}"] = 100 * float(spearmanr(predictions, rows["score"]).statistic)
        else:
            from sklearn.metrics import f1_score

            predicted, gold = np.asarray(predictions).argmax(-1), np.asarray(rows["label"])
            result[f"cross_{split}"] = 100 * float((predicted == gold).mean())
            result[f"cross_{split}_macro_f1"] = 100 * float(f1_score(gold, predicted, average="macro"))
    return result


def default_backbone() -> str:
    from multitask_st import default_backbone as bundled

    return bundled()


# ---------------------------------------------------------------------------------------------- the table


def summary(results: dict, dataset: str, config: str) -> dict[str, str]:
    runs = [value for key, value in results.items() if key.startswith(f"{dataset}/{config}/")]
    keys = sorted({key for run in runs for key in run})
    return {
        key: f"{np.mean([run[key] for run in runs]):.2f} ± {np.std([run[key] for run in runs]):.2f}"
        for key in keys
        if all(key in run for run in runs)
    } | {"seeds": str(len(runs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--output_root", default="outputs/cross-encoder")
    parser.add_argument("--results_json", default=None, help="default: OUTPUT_ROOT/results.json")
    parser.add_argument("--one", nargs=3, metavar=("DATASET", "CONFIG", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.output_root)
    root.mkdir(parents=True, exist_ok=True)
    if args.one:  # one run, in its own process
        dataset, config, seed = args.one
        folder = root / f"{dataset}-{config}-seed{seed}"
        if config == "st-cross":
            result = run_sentence_transformers(dataset, int(seed), args, folder)
        else:
            result = run_ours(dataset, config, int(seed), args, folder)
        (root / f"{dataset}-{config}-seed{seed}.result.json").write_text(json.dumps(result, indent=2))
        return
    results_path = Path(args.results_json or root / "results.json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for dataset in args.datasets:
        for config in args.configs:
            for seed in args.seeds:
                key = f"{dataset}/{config}/{seed}"
                if key in results:
                    continue
                command = [sys.executable, __file__, "--one", dataset, config, str(seed)]
                command += ["--data_dir", args.data_dir, "--output_root", str(root), "--epochs", str(args.epochs)]
                command += ["--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate)]
                command += ["--max_seq_length", str(args.max_seq_length)]
                subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                results[key] = json.loads((root / f"{dataset}-{config}-seed{seed}.result.json").read_text())
                results_path.write_text(json.dumps(results, indent=2))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.epochs} epochs, batch "
          f"{args.batch_size}, lr {args.learning_rate}, max length {args.max_seq_length}")  # fmt: skip
    for dataset in args.datasets:
        print(f"\n{dataset}: {primary(dataset)} x100, validation / test (mean ± std over seeds)")
        for config in args.configs:
            row = summary(results, dataset, config)
            print(f"  {config:<12} {json.dumps(row)}")


if __name__ == "__main__":
    main()
