"""Embedding quality vs head quality on real data: what multi-task training does to the sentence embedding, what
each protection keeps, and what the embedding tasks (similarity, pair classification, contrastive) add.

    python benchmarks/bench_embedding_protection.py --data_dir ../shared/data --seeds 0 1 2 [--configs ...]

Every run is `python train.py <config.json>` in a subprocess (its own peak memory, its own thread pool), starting
from the bundled all-MiniLM-L6-v2, and is scored on the test splits:
- heads: SST-2 accuracy, TREC-6 accuracy, WikiANN-en entity F1 (test splits);
- embedding: STS-B test Spearman x100 of `model.encode` cosines (what a sentence-transformers user measures);
- embedding tasks: STS-B Spearman, MRPC accuracy / macro-F1, MRPC-paraphrase retrieval MRR / recall@1;
- cost: training time, peak resident memory of the training process, trainable parameters.
Results are cached per (config, seed) in `--output_root` (rerun with the same options to only add what is missing)
and written as mean ± std over seeds to `--results` (markdown) and `--results_json`.

Budget: `--steps_per_task N` gives a run of n tasks n x N optimizer steps (batches of one task each, drawn by
temperature sampling over equal-size subsets), so every task sees about N batches, as in its single-task run of N
steps; `--steps S` instead gives every multi-task run S steps and single-task runs S x `--single_fraction`.

Configs (`--configs`, default: all), every one with train.py's defaults unless it says otherwise:
- `heads-none-linear`: SST-2 + TREC + WikiANN, every head on the shared vector / token states, no protection (the
  behaviour before this project protected the embedding);
- `heads-distillation-linear`: the same heads with distillation at weight 10 (the protection measured first);
- `heads-distillation`: the default recipe (distillation at its default weight, 3; sentence heads with their own
  attention pooling and own copies of the top two layers, the token head with its own copies of the top two layers);
- `heads-distillation-w10`: the same at weight 10 (the default weight before 3);
- `heads-none`: the recipe's heads, no protection (full fine-tuning: the reference for LoRA and for the heads);
- `heads-l2sp`, `heads-lora`: the recipe's heads with L2-SP instead, or with LoRA (rank 8) and no protection;
- `heads-isolation`: the recipe's heads, each training only its own layers (the shared encoder frozen);
- `heads+sts`: the recipe + `similarity` on STS-B train (the default protection then: isolation, weight 0.9);
- `heads+sts-distillation`: the same with distillation at weight 10 (the default before isolation);
- `heads+sts-isolation`: the same with full isolation (the shared encoder learns from STS-B only);
- `heads+sts+mrpc`: the recipe + STS-B similarity + MRPC `pair_classification` + `contrastive` on MRPC's paraphrases;
- `heads+sts+mrpc_pair`, `heads+sts+mrpc_retrieval`: the six-task mix without MRPC retrieval, or without MRPC pair
  classification (which of them moves STS-B);
- `heads+sts+mrpc-sts-w2`, `-sts-w4`: the six-task mix with STS-B's `loss_weight` 2 or 4;
- `single-<task>`: one task alone, the recipe's heads, no protection (nothing else to protect it from), per task.
Model selection uses validation splits only: test splits are scored once, after training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADS = ("sst2", "trec", "wikiann")
TASKS = {
    "sst2": {
        "type": "classification",
        "folder": "sst2",
        "text_column": "sentence",
        "label_column": "label",
        "labels": ["negative", "positive"],
        "eval_split": "validation",
        "test_split": "test",
    },
    "trec": {
        "type": "classification",
        "folder": "trec",
        "label_column": "coarse_label",
        "train_split": "train[:-500]",
        "eval_split": "train[-500:]",
        "test_split": "test",
    },
    "wikiann": {
        "type": "token_classification",
        "folder": "wikiann-en",
        "eval_split": "validation",
        "test_split": "test",
        "max_eval_samples": 1000,
        "max_test_samples": 2000,
    },
    "stsb": {
        "type": "similarity",
        "folder": "stsb",
        "label_column": "score",
        "score_range": [0, 5],
        "eval_split": "validation",
        "test_split": "test",
    },
    "mrpc": {
        "type": "pair_classification",
        "folder": "mrpc",
        "label_column": "label",
        "labels": ["not_equivalent", "equivalent"],
        "train_split": "train[:-400]",
        "eval_split": "train[-400:]",
        "test_split": "test",
    },
    "mrpc_retrieval": {
        "type": "contrastive",
        "folder": "mrpc",
        "text_column": "sentence1",
        "text_pair_column": "sentence2",
        "row_filter": {"label": 1},
        "train_split": "train[:-400]",
        "eval_split": "train[-400:]",
        "test_split": "test",
    },
}
# The score of each task that the tables show (metric key in metrics.json, column title).
SCORES = {
    "sst2": ("accuracy", "SST-2 acc"),
    "trec": ("accuracy", "TREC acc"),
    "wikiann": ("f1", "WikiANN F1"),
    "stsb": ("spearman", "STS-B task ρ"),
    "mrpc": ("accuracy", "MRPC acc"),
    "mrpc_retrieval": ("mrr", "MRPC MRR"),
}
# The default recipe's heads (train.py's defaults): sentence heads with their own attention pooling and copies of
# the encoder's top two layers (one until 2 became the default: `--extra --head_layers 1`), token heads with their own
# copies of the top two layers. "linear heads" = every head on the shared vector
# / token states.
RECIPE_HEADS: list[str] = []
LINEAR_HEADS = ["--head_pooling", "shared", "--token_head_layers", "0"]
FULL_ISOLATION = ["--embedding_protection", "isolation", "--protection_weight", "1"]  # heads' gradients all kept out
DISTILLATION_W10 = ["--embedding_protection", "distillation", "--protection_weight", "10"]  # the default before 3
SIX_TASKS = (*HEADS, "stsb", "mrpc", "mrpc_retrieval")
# config: (tasks, train.py flags[, per-task keys that replace TASKS' own, e.g. a loss_weight])
CONFIGS = {
    "heads-none-linear": (HEADS, [*LINEAR_HEADS, "--embedding_protection", "none"]),
    "heads-distillation-linear": (HEADS, [*LINEAR_HEADS, *DISTILLATION_W10]),
    "heads-none": (HEADS, [*RECIPE_HEADS, "--embedding_protection", "none"]),
    "heads-distillation": (HEADS, [*RECIPE_HEADS, "--embedding_protection", "distillation"]),
    "heads-distillation-w10": (HEADS, [*RECIPE_HEADS, *DISTILLATION_W10]),
    "heads-l2sp": (HEADS, [*RECIPE_HEADS, "--embedding_protection", "l2sp"]),
    "heads-lora": (HEADS, [*RECIPE_HEADS, "--embedding_protection", "none", "--lora_rank", "8"]),
    "heads-isolation": (HEADS, [*RECIPE_HEADS, *FULL_ISOLATION]),
    "heads+sts": ((*HEADS, "stsb"), RECIPE_HEADS),
    "heads+sts-distillation": ((*HEADS, "stsb"), [*RECIPE_HEADS, *DISTILLATION_W10]),
    "heads+sts-isolation": ((*HEADS, "stsb"), [*RECIPE_HEADS, *FULL_ISOLATION]),
    "heads+sts+mrpc": (SIX_TASKS, RECIPE_HEADS),
    # What in the six-task mix moves STS-B, and what a user can do about it (judged on validation): each MRPC task
    # left out, STS-B's loss weighted up.
    "heads+sts+mrpc_pair": ((*HEADS, "stsb", "mrpc"), RECIPE_HEADS),
    "heads+sts+mrpc_retrieval": ((*HEADS, "stsb", "mrpc_retrieval"), RECIPE_HEADS),
    "heads+sts+mrpc-sts-w2": (SIX_TASKS, RECIPE_HEADS, {"stsb": {"loss_weight": 2.0}}),
    "heads+sts+mrpc-sts-w4": (SIX_TASKS, RECIPE_HEADS, {"stsb": {"loss_weight": 4.0}}),
    **{f"single-{task}": ((task,), [*RECIPE_HEADS, "--embedding_protection", "none"]) for task in TASKS},
}


def task_dicts(data_dir: Path, names, train_samples: int, overrides: dict | None = None) -> list[dict]:
    specs = []
    for name in names:
        task = {key: value for key, value in TASKS[name].items() if key != "folder"}
        task.update((overrides or {}).get(name, {}))
        specs.append(
            {"name": name, "dataset": str(data_dir / TASKS[name]["folder"]), "max_train_samples": train_samples, **task}
        )
    return specs


def last_flag(flags: list[str], option: str, default):
    """The value of `option` in `flags` (the last one wins, as in argparse), else `default`."""
    values = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == option]
    return values[-1] if values else default


def expected_protection(names, flags: list[str]) -> dict:
    """The embedding protection (method, weight) train.py resolves for these tasks and flags: what its training
    record must say for a cached run to count as this one."""
    from multitask_st.protection import protection_setting

    tasks = [{"type": TASKS[name].get("type", "classification")} for name in names]
    weight = last_flag(flags, "--protection_weight", None)
    method, weight = protection_setting(
        last_flag(flags, "--embedding_protection", "auto"), None if weight is None else float(weight), tasks
    )
    return {"method": method, "weight": weight}


def own_view(head: dict | None) -> dict:
    """What of a head the bench compares: its own pooling and its own copies of the encoder's top layers."""
    head = head or {}
    return {"pooling": head.get("pooling", "shared"), "layers": head.get("layers", 0)}


def expected_heads(names, flags: list[str]) -> dict:
    """Each task's `own_view` of the head train.py gives these tasks and flags, from its defaults of today: what a
    cached run's saved config must say to count as this one."""
    from dataclasses import fields

    from multitask_st.arguments import HeadSettings
    from tasks_mtl import task_class

    defaults = HeadSettings()
    settings = HeadSettings(
        **{
            f.name: type(getattr(defaults, f.name))(last_flag(flags, f"--{f.name}", getattr(defaults, f.name)))
            for f in fields(HeadSettings)
        }
    )
    return {
        name: own_view(task_class(TASKS[name].get("type", "classification")).default_head(settings)) for name in names
    }


def run_config(args, config: str, seed: int) -> dict:
    """Train one (config, seed) in a subprocess, or return its cached result."""
    folder = Path(args.output_root) / f"{config}-seed{seed}"
    result_path = folder / "bench_result.json"
    names, flags, *overrides = CONFIGS[config]
    if args.steps_per_task:
        steps = args.steps_per_task * len(names)
    else:
        steps = args.steps if len(names) > 1 else max(1, round(args.steps * args.single_fraction))
    settings = {"steps": args.steps, "train_samples": args.train_samples, "extra": args.extra, "flags": flags}
    if args.steps_per_task:
        settings["steps_per_task"] = args.steps_per_task
    # The protection and heads a run trained with are part of what it is: a changed default (distillation's weight
    # went from 10 to 3, the sentence heads' own layers from 1 to 2) changes the run behind the same flags, so a
    # folder that holds a finished run trained with others is neither reused nor written over.
    expected = expected_protection(names, [*flags, *args.extra])
    record_path = folder / "model" / "training_config.json"
    recorded = json.loads(record_path.read_text()).get("embedding_protection") if record_path.is_file() else None
    if recorded is not None and recorded != expected:
        raise RuntimeError(
            f"{folder} holds a run trained with embedding protection {recorded}, but {config} with these flags now "
            f"trains with {expected}: use another --output_root, or delete the folder to train it again"
        )
    heads = expected_heads(names, [*flags, *args.extra])
    config_path = folder / "model" / "config.json"
    tasks = json.loads(config_path.read_text())["tasks"] if config_path.is_file() else None
    saved = None if tasks is None else {task["name"]: own_view(task.get("head")) for task in tasks}
    if saved is not None and saved != heads:
        raise RuntimeError(
            f"{folder} holds a run whose heads were {saved}, "
            f"but {config} with these flags now trains {heads}: use another --output_root, or delete the folder to "
            "train it again (--extra --head_layers 1 gives the sentence heads of the runs before 2 became the default)"
        )
    weights = {task["name"]: task.get("loss_weight", 1.0) for task in tasks or []}
    wanted = {name: (overrides[0] if overrides else {}).get(name, {}).get("loss_weight", 1.0) for name in weights}
    if weights != wanted:
        raise RuntimeError(
            f"{folder} holds a run trained with loss weights {weights}, but {config} trains with {wanted}: use another "
            "--output_root, or delete the folder to train it again"
        )
    if result_path.is_file():  # the same run whichever way its steps were asked for
        cached = json.loads(result_path.read_text())
        same = all(cached.get("settings", {}).get(key) == settings[key] for key in ("train_samples", "extra"))
        if "flags" in cached.get("settings", {}):
            same = same and cached["settings"]["flags"] == flags
        if cached.get("steps") == steps and same:
            metrics_path = folder / "model" / "metrics.json"
            if "validation" not in cached and metrics_path.is_file():  # cached before validation scores were kept
                cached["validation"] = json.loads(metrics_path.read_text()).get("eval", {})
                result_path.write_text(json.dumps(cached, indent=2))
            return cached
    job = {
        "tasks": task_dicts(Path(args.data_dir), names, args.train_samples, *overrides),
        "output_dir": str(folder / "model"),
        "overwrite_output_dir": True,
        "max_steps": steps,
        "max_seq_length": args.max_seq_length,
        "eval_strategy": "no",
        "save_strategy": "no",
        "seed": seed,
        "num_examples_to_print": 0,
        "drift_sample_size": 1000,
    }
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "train.py"), str(folder / "job.json"), *flags, *args.extra]
    model_dir = folder / "model"
    peak_rss_mib = None
    # A run whose training finished but whose scoring was interrupted is scored, not trained again (its peak
    # memory is then unknown): train.py writes metrics.json only after the model is saved.
    finished = (model_dir / "metrics.json").is_file() and (folder / "job.json").is_file()
    if not (finished and json.loads((folder / "job.json").read_text()) == job):
        (folder / "job.json").write_text(json.dumps(job, indent=2))
        log(f"{config} seed {seed}: {shlex.join(command[1:])}")
        with open(folder / "train.log", "w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise RuntimeError(f"{config} seed {seed} failed (status {status}); see {folder / 'train.log'}")
        peak_rss_mib = usage.ru_maxrss / 1024
    metrics = json.loads((model_dir / "metrics.json").read_text())
    record = json.loads((model_dir / "training_config.json").read_text())
    result = {
        "settings": settings,
        "config": config,
        "seed": seed,
        "steps": steps,
        "test": metrics.get("test", {}),
        "validation": metrics.get("eval", {}),
        "embedding": metrics.get("embedding", {}),
        "stsb_encode": stsb_spearman(model_dir, Path(args.data_dir)),
        "stsb_encode_validation": stsb_spearman(model_dir, Path(args.data_dir), "validation"),
        "train_runtime_s": record["train_runtime_s"],
        "peak_rss_mib": peak_rss_mib,
        "trainable_parameters": trainable_parameters(folder / "train.log"),
        "model_mib": folder_mib(model_dir, "*.safetensors"),
        "lora_adapter_mib": folder_mib(model_dir / "lora_adapter", "*.safetensors") or None,
        "hardware": record["hardware"],
    }
    result_path.write_text(json.dumps(result, indent=2))
    log(f"  -> STS-B {result['stsb_encode']:.2f}, {result['train_runtime_s']:.0f} s")
    return result


def stsb_spearman(model_dir: Path | str, data_dir: Path, split: str = "test") -> float:
    """STS-B Spearman x100 of the cosine of `model.encode` embeddings (on the test split: the MTEB measurement)."""
    import torch
    from scipy.stats import spearmanr

    from modeling_mtl import MultiTaskModel

    rows = [json.loads(line) for line in (data_dir / "stsb" / f"{split}.jsonl").open()]
    model = MultiTaskModel.from_pretrained(str(model_dir))
    with torch.inference_mode():
        a = model.encode([row["sentence1"] for row in rows], normalize=True)
        b = model.encode([row["sentence2"] for row in rows], normalize=True)
    return float(100 * spearmanr((a * b).sum(1), [row["score"] for row in rows])[0])


def folder_mib(folder: Path, pattern: str) -> float:
    return sum(path.stat().st_size for path in folder.glob(pattern)) / 2**20 if folder.is_dir() else 0.0


def base_model_scores(data_dir: Path, output_root: Path) -> dict:
    """STS-B of the untouched all-MiniLM-L6-v2, through the same path as every trained model (saved, reloaded)."""
    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone

    folder = output_root / "base-model"
    if not (folder / "config.json").is_file():
        MultiTaskModel.from_backbone(default_backbone()).save_pretrained(folder)
    return {
        "seeds": [],
        "stsb_encode": [stsb_spearman(folder, data_dir)],
        "stsb_encode_validation": [stsb_spearman(folder, data_dir, "validation")],
        "train_runtime_s": [],
        "peak_rss_mib": [],
        "cosine_to_initial": [1.0],
        "knn_overlap": [1.0],
    }


def trainable_parameters(log_path: Path) -> int | None:
    for line in log_path.read_text().splitlines():
        if line.startswith("trainable parameters:"):
            return int(line.split(":")[1].split()[0].replace(",", ""))
    return None


def log(message: str) -> None:
    print(message, flush=True)


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def summarise(results: dict[str, list[dict]]) -> dict:
    summary = {}
    for config, runs in results.items():
        row = {
            "seeds": [run["seed"] for run in runs],
            "stsb_encode": [run["stsb_encode"] for run in runs],
            "stsb_encode_validation": [run.get("stsb_encode_validation") for run in runs],
            "train_runtime_s": [run["train_runtime_s"] for run in runs],
            "peak_rss_mib": [run["peak_rss_mib"] for run in runs],
            "trainable_parameters": [run.get("trainable_parameters") for run in runs],
            "lora_adapter_mib": [run.get("lora_adapter_mib") for run in runs],
            "cosine_to_initial": [run["embedding"].get("eval", {}).get("cosine_to_initial") for run in runs],
            "knn_overlap": [
                next((v for k, v in run["embedding"].get("eval", {}).items() if k.startswith("knn")), None)
                for run in runs
            ],
        }
        for task, (metric, _) in SCORES.items():
            for split, key in (("test", task), ("validation", f"{task}_validation")):
                values = [100 * run[split][task][metric] for run in runs if task in run.get(split, {})]
                if values:
                    row[key] = values
        summary[config] = row
    return summary


def markdown(summary: dict, command: str, hardware: str) -> str:
    columns = [
        "STS-B test ρ (encode)",
        "STS-B val ρ",
        *[title for _, title in SCORES.values()],
        "cos to initial",
        "kNN overlap",
    ]
    lines = [
        f"Command: `{command}`",
        "",
        f"Hardware: {hardware}",
        "",
        "| config | " + " | ".join(columns) + " | train time (s) | peak RSS (MiB) |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for config, row in summary.items():
        cells = [mean_std(row["stsb_encode"]), mean_std(row.get("stsb_encode_validation", []))]
        cells += [mean_std(row.get(task, [])) for task in SCORES]
        cells += [mean_std(row["cosine_to_initial"]), mean_std(row["knn_overlap"])]
        cells += [mean_std(row["train_runtime_s"]), mean_std(row["peak_rss_mib"])]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    # The validation splits: what every choice was made on (the heads' scores above are the test splits').
    lines += [
        "",
        "Validation splits:",
        "",
        "| config | STS-B val ρ (encode) | " + " | ".join(title for _, title in SCORES.values()) + " |",
        "|---|" + "---|" * (len(SCORES) + 1),
    ]
    for config, row in summary.items():
        cells = [mean_std(row.get("stsb_encode_validation", []))]
        cells += [mean_std(row.get(f"{task}_validation", [])) for task in SCORES]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=900, help="optimizer steps of a multi-task run")
    parser.add_argument(
        "--single_fraction", type=float, default=1 / 3, help="steps of a single-task run, as a fraction of --steps"
    )
    parser.add_argument(
        "--steps_per_task",
        type=int,
        default=None,
        help="instead of --steps / --single_fraction: a run of n tasks trains n x this many steps, so that every task "
        "sees about as many batches as in its single-task run (equal-size tasks, temperature sampling)",
    )
    parser.add_argument("--train_samples", type=int, default=4000, help="training rows per task (seeded subset)")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--output_root", default="outputs/bench_embedding_protection")
    parser.add_argument("--results", default=None, help="write the markdown table here")
    parser.add_argument("--results_json", default=None)
    parser.add_argument("--score_model", default=None, help="only print STS-B test / validation of this saved model")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every run")
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "sst2").is_dir():
        parser.error(f"no real data at {args.data_dir}")
    if args.score_model:  # e.g. the embedded default job: python train.py, then this
        test, validation = (
            stsb_spearman(args.score_model, Path(args.data_dir), split) for split in ("test", "validation")
        )
        print(
            f"{args.score_model}: STS-B test {test:.2f}, validation {validation:.2f} (Spearman x100 of encode cosines)"
        )
        return 0
    results: dict[str, list[dict]] = {}
    for config in args.configs:
        for seed in args.seeds:
            results.setdefault(config, []).append(run_config(args, config, seed))
    summary = summarise(results)
    base = base_model_scores(Path(args.data_dir), Path(args.output_root))
    summary = {"base model (untrained)": base, **summary}
    hardware = next(iter(results.values()))[0]["hardware"] + f"; {platform.machine()}"
    command = "python benchmarks/bench_embedding_protection.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    table = markdown(summary, command, hardware)
    print(table)
    if args.results:
        Path(args.results).write_text(table)
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
