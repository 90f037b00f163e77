"""Training choices measured on real data: what to freeze, how to mix abundant and scarce tasks, what the
pretrained encoder buys.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 1 \\
        python benchmarks/bench_training_choices.py --data_dir ../shared/data --threads 1 \\
        [--groups freezing,heads,scarce,transfer,seeds] [--steps 300] [--reuse]

Groups (each run is `train.py`, started in this process through `bench_multitask_training.run_training`, on
SST-2 sentiment, TREC coarse question type and WikiANN-en NER; same steps, batch, lengths and learning rates):

- `freezing`: full fine-tuning vs `--freeze_backbone` vs `--freeze_layers 3` (embeddings + lower 3 of 6 layers)
  vs `--freeze_embeddings`, all three tasks together.
- `heads`: "one head frozen while another task trains". Phase 1 trains sentiment + question_type with `train.py`;
  phase 2 continues from that model on NER only with (a) the old heads frozen, encoder trainable, (b) the old heads
  and the encoder frozen, (c) nothing frozen (reference). `train.py` cannot start from a saved `MultiTaskModel`
  (it builds a fresh model from an encoder and keeps only the `--tasks` heads), so phase 2 is done here with the
  public pieces: `MultiTaskModel.from_pretrained`, `MultiTaskModel.add_tasks`, `build_datasets`,
  `MultiTaskTrainer` and `apply_freezing`. Reported: test scores before/after phase 2 (forgetting, NER gained).
- `scarce`: SST-2 with many rows (`--abundant_samples`, 20,000) next to TREC with few (`--scarce_samples`, 300),
  same steps: `--task_sampling` proportional vs temperature (T=2) vs uniform (static weighting), and
  `--loss_weighting uncertainty` with the default (temperature) sampling.
- `transfer`: the pretrained all-MiniLM-L6-v2 vs the same architecture randomly initialised (built from its
  config, same tokenizer and pooling settings), same budget. The pretrained row is the `freezing` group's `full`
  run when both groups run (identical settings).
- `seeds`: the full fine-tuning run again with `--extra_seeds` (seed-to-seed noise of the setup).

Every row reports test scores, training time (the Trainer's `train_runtime`), trainable parameters and the
optimizer state actually held by the optimizer (bytes of its state tensors and the parameters that have state),
recorded by a `TrainerCallback`. The tables go to `--results` (markdown) and `<output_root>/results.json`.
Use `--threads` (torch.set_num_threads) together with `taskset` to pin the runs to one core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_encode import cpu_name  # noqa: E402
from bench_multitask_training import TASKS, run_training, task_specs  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from multitask_st.continue_training import continue_training  # noqa: E402

GROUPS = ("freezing", "heads", "scarce", "transfer", "seeds")
FREEZING_RUNS = {
    "full": ("full fine-tuning", []),
    "freeze_embeddings": ("frozen embeddings", ["--freeze_embeddings", "true"]),
    "freeze_layers3": ("frozen embeddings + layers 0-2 (of 6)", ["--freeze_layers", "3"]),
    "frozen_backbone": ("frozen encoder (heads only)", ["--freeze_backbone", "true"]),
}
PHASE2_VARIANTS = {
    "heads_frozen": ("(a) old heads frozen, encoder trains", {"freeze_heads": True, "freeze_backbone": False}),
    "heads_and_encoder_frozen": (
        "(b) old heads + encoder frozen",
        {"freeze_heads": True, "freeze_backbone": True},
    ),
    "nothing_frozen": ("(c) nothing frozen (reference)", {"freeze_heads": False, "freeze_backbone": False}),
    # The old tasks keep training beside NER ("rehearsal"); their heads stay fixed, so the encoder is pulled
    # back towards features the old heads can still read.
    "heads_frozen_rehearsal": (
        "(d) old heads frozen, old tasks rehearsed with NER",
        {"freeze_heads": True, "freeze_backbone": False, "train_tasks": ["sentiment", "question_type", "ner"]},
    ),
}
SCARCE_RUNS = {
    "proportional": ("proportional", "static", ["--task_sampling", "proportional"]),
    "temperature": ("temperature T=2 (default)", "static", ["--task_sampling", "temperature"]),
    "uniform": ("uniform", "static", ["--task_sampling", "uniform"]),
    "uncertainty": ("temperature T=2 (default)", "uncertainty", ["--loss_weighting", "uncertainty"]),
}
TREC_COARSE_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
NAMES = list(TASKS)  # sentiment, question_type, ner
SHORT = {name: TASKS[name]["metric"][1] for name in NAMES}


def log(message: str) -> None:
    print(f"[bench_training_choices {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ reusable pieces


def optimizer_state_size(optimizer: Any) -> tuple[int, int]:
    """(bytes held in the optimizer's state tensors, number of parameter elements that have optimizer state).

    Works on a plain `torch.optim.Optimizer` and on accelerate's wrapper (which keeps the real one in `.optimizer`).
    """
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    state_bytes = params_with_state = 0
    for parameter, state in inner.state.items():
        tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
        if not tensors:
            continue
        params_with_state += parameter.numel()
        state_bytes += sum(value.numel() * value.element_size() for value in tensors)
    return state_bytes, params_with_state


class OptimizerStateProbe(TrainerCallback):
    """Records the trainable parameters at the start of training and the peak optimizer state over the steps."""

    def __init__(self):
        self.total_params = self.trainable_params = 0
        self.peak_state_bytes = self.params_with_state = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.total_params = sum(p.numel() for p in model.parameters())
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        state_bytes, params = optimizer_state_size(optimizer)
        if state_bytes >= self.peak_state_bytes:
            self.peak_state_bytes, self.params_with_state = state_bytes, params

    def as_dict(self) -> dict[str, int]:
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "params_with_optimizer_state": self.params_with_state,
            "optimizer_state_bytes": self.peak_state_bytes,
        }


def make_random_init_backbone(source: str | Path, target: str | Path, seed: int = 42) -> Path:
    """Save an encoder with `source`'s architecture and tokenizer but random weights (the model class's own
    initialisation), plus `source`'s sentence-transformers settings files (pooling, normalisation, max length) so
    that `MultiTaskModel.from_backbone` sets it up exactly like the pretrained one."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    for folder in source.glob("*_Pooling"):
        shutil.copytree(folder, target / folder.name, dirs_exist_ok=True)
    return target


def batches_per_source(
    source_sizes: list[int], batch_size: int, strategy: str, temperature: float, seed: int, steps: int
) -> list[int]:
    """How many of the first `steps` batches `MultiTaskSampler` draws from each source (the schedule the
    Trainer replays: epoch e uses `set_epoch(e)`)."""
    from multitask_st.trainer import MultiTaskSampler

    sampler = MultiTaskSampler(source_sizes, batch_size, strategy, temperature, seed)
    counts = [0] * len(source_sizes)
    epoch, left = 0, steps
    while left > 0:
        sampler.set_epoch(epoch)
        for source in sampler.batch_sources()[:left]:
            counts[source] += 1
        left -= min(left, sampler.num_batches)
        epoch += 1
    return counts


# ------------------------------------------------------------------------------------------ the benchmark


def hardware_line() -> str:
    import torch
    import transformers

    if torch.cuda.is_available():
        device = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        device = (
            f"CPU {cpu_name()} ({os.cpu_count()} cores on the machine, this process pinned to core(s) "
            f"{','.join(map(str, affinity))}), no GPU"
        )
    return (
        f"{device}; torch threads {torch.get_num_threads()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, {platform.system()}"
    )


class Bench:
    """Runs (or, with `--reuse`, re-reads) the runs and keeps their results by name."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.output_root = Path(args.output_root)
        self.results: dict[str, dict[str, Any]] = {}
        self.count = 0

    def settings(self, extra: Any) -> dict[str, Any]:
        keys = (
            "steps",
            "batch_size",
            "max_seq_length",
            "learning_rate",
            "head_learning_rate",
            "train_samples",
            "eval_samples",
            "test_samples",
        )
        return {**{key: getattr(self.args, key) for key in keys}, "extra": extra}

    def cached(self, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        path = self.output_root / name / "bench_result.json"
        if self.args.reuse and path.is_file():
            result = json.loads(path.read_text())
            if result.get("settings") == json.loads(json.dumps(settings)):
                log(f"reusing {name} from {path}")
                return result
        return None

    def store(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        path = self.output_root / name / "bench_result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=float) + "\n")
        self.results[name] = result
        return result

    def train(self, name: str, tasks: list, extra: list[str], model: str | None = None, seed: int | None = None):
        """One `train.py` run through `run_training`, with the optimizer-state probe."""
        if name in self.results:
            return self.results[name]
        run_args = argparse.Namespace(**vars(self.args))
        if model is not None:
            run_args.model_name_or_path = model
        if seed is not None:
            run_args.seed = seed
        settings = self.settings({"tasks": tasks, "flags": extra, "model": model, "seed": run_args.seed})
        cached = self.cached(name, settings)
        if cached is not None:
            self.results[name] = cached
            return cached
        self.count += 1
        log(f"run {self.count}: {name} ({' '.join(extra) or 'defaults'}) ...")
        started = time.time()
        probe = OptimizerStateProbe()
        result = run_training(name, tasks, self.output_root, self.args.steps, run_args, extra, callbacks=[probe])
        config = json.loads((Path(result["output"]) / "training_config.json").read_text())
        result.update(probe.as_dict())
        result["settings"] = settings
        result["learned_task_weights"] = config["hyperparameters"].get("learned_task_weights")
        result["num_train_examples"] = {task: spec["num_train_examples"] for task, spec in config["tasks"].items()}
        result["test"] = result["metrics"].get("test", {})
        log(f"run {self.count}: {name} done in {time.time() - started:.0f} s: {describe_scores(result['test'])}")
        return self.store(name, result)

    def continue_run(self, name: str, phase1_dir: str, task_dicts: list, variant: dict[str, bool]):
        settings = self.settings({"phase1": phase1_dir, "tasks": task_dicts, "variant": variant})
        cached = self.cached(name, settings)
        if cached is not None:
            self.results[name] = cached
            return cached
        self.count += 1
        train_tasks = variant.get("train_tasks", ["ner"])
        log(f"run {self.count}: {name} (phase 2 on {'+'.join(train_tasks)}, {variant}) ...")
        started = time.time()
        probe = OptimizerStateProbe()
        result = continue_training(
            phase1_dir,
            task_dicts,
            train_tasks,
            self.output_root / name,
            training_arguments=phase2_training_arguments(self.args),
            freeze_old_heads=variant["freeze_heads"],
            freeze_backbone=variant["freeze_backbone"],
            max_seq_length=self.args.max_seq_length,
            head_learning_rate=self.args.head_learning_rate,
            embedding_protection="none",  # as recorded in docs/TRAINING_CHOICES.md
            callbacks=[probe],
        )
        result.update(probe.as_dict())
        result["settings"] = settings
        result["test"] = result["after"]
        result["wall_s"] = time.time() - started
        log(f"run {self.count}: {name} done in {time.time() - started:.0f} s: {describe_scores(result['after'])}")
        return self.store(name, result)


def phase2_training_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainingArguments `run_training` gives `train.py`, as keywords (phase 2 runs outside train.py)."""
    return {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": 128,
        "learning_rate": args.learning_rate,
        "warmup_steps": 0.1,
        "weight_decay": 0.01,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 50,
        "report_to": "none",
        "seed": args.seed,
        "dataloader_num_workers": 0,
    }


def score(test: dict, task: str) -> float | None:
    value = test.get(task, {}).get(TASKS[task]["metric"][0])
    return None if value is None else 100 * value


def describe_scores(test: dict) -> str:
    return ", ".join(f"{SHORT[t]} {score(test, t):.2f}" for t in NAMES if score(test, t) is not None)


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def fmt_count(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"


def fmt_bytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def cost_cells(result: dict) -> str:
    return (
        f"{result['train_runtime_s']:.0f} | {fmt_count(result['trainable_params'])} | "
        f"{fmt_count(result['params_with_optimizer_state'])} | {fmt_bytes(result['optimizer_state_bytes'])} |"
    )


COST_HEADER = "train time (s) | trainable params | params with optimizer state | optimizer state |"


def scores_row(label: str, result: dict) -> str:
    scores = [score(result["test"], task) for task in NAMES]
    mean = sum(scores) / len(scores) if all(s is not None for s in scores) else None
    return f"| {label} | {' | '.join(fmt(s) for s in scores)} | {fmt(mean)} | {cost_cells(result)}"


# ------------------------------------------------------------------------------------------ groups


def run_freezing(bench: Bench, tasks: list) -> list[str]:
    rows = []
    for key, (label, flags) in FREEZING_RUNS.items():
        result = bench.train(f"freezing-{key}", tasks, flags)
        rows.append(scores_row(f"{label} (`{' '.join(flags) or 'no flag'}`)", result))
    return [
        "## Freezing",
        "",
        "All three tasks trained together from all-MiniLM-L6-v2; only the frozen parameters differ.",
        "",
        f"| setup | SST-2 acc | TREC acc | WikiANN F1 | mean | {COST_HEADER}",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def run_heads(bench: Bench, data_dir: Path) -> list[str]:
    args = bench.args
    phase1_tasks = task_specs(data_dir, ["sentiment", "question_type"], *samples(args))
    phase1 = bench.train("heads-phase1", phase1_tasks, [])
    all_tasks = task_specs(data_dir, NAMES, *samples(args))
    for task in all_tasks:  # phase 2 scores the test splits only
        task["eval_split"] = None
        task.pop("max_eval_samples", None)
    results = {}
    for key, (_, variant) in PHASE2_VARIANTS.items():
        results[key] = bench.continue_run(f"heads-phase2-{key}", phase1["output"], all_tasks, variant)
    before = next(iter(results.values()))["before"]
    lines = [
        "## One head frozen while another task trains",
        "",
        f"Phase 1: `train.py` on sentiment + question_type, {args.steps} steps: SST-2 "
        f"{fmt(score(phase1['test'], 'sentiment'))}, TREC {fmt(score(phase1['test'], 'question_type'))} "
        f"({phase1['train_runtime_s']:.0f} s). Phase 2: that model plus a new NER head, {args.steps} steps on NER "
        f"only in (a)-(c), on NER and the two old tasks (temperature sampling) in (d). 'before' = the phase-1 "
        f"model with the untrained NER head: SST-2 {fmt(score(before, 'sentiment'))}, "
        f"TREC {fmt(score(before, 'question_type'))}, WikiANN F1 {fmt(score(before, 'ner'))}.",
        "",
        "| phase 2 | SST-2 acc after (change) | TREC acc after (change) | WikiANN F1 after (gain) | "
        f"phase-2 {COST_HEADER}",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, (label, _) in PHASE2_VARIANTS.items():
        after = results[key]["after"]
        cells = []
        for task in NAMES:
            new, old = score(after, task), score(before, task)
            cells.append(f"{fmt(new)} ({fmt(new - old, signed=True)})")
        lines.append(f"| {label} | {' | '.join(cells)} | {cost_cells(results[key])}")
    return [*lines, ""]


def run_scarce(bench: Bench, data_dir: Path) -> list[str]:
    args = bench.args
    tasks = task_specs(data_dir, ["sentiment", "question_type"], *samples(args))
    tasks[0]["max_train_samples"] = args.abundant_samples
    tasks[1]["max_train_samples"] = args.scarce_samples
    # A few hundred rows may miss a rare class (ABBR is 1.6% of TREC): name the labels so eval/test rows still fit.
    tasks[1]["labels"] = TREC_COARSE_LABELS
    rows = []
    for key, (sampling, weighting, flags) in SCARCE_RUNS.items():
        result = bench.train(f"scarce-{key}", tasks, flags)
        sizes = [result["num_train_examples"]["sentiment"], result["num_train_examples"]["question_type"]]
        strategy = flags[1] if flags[0] == "--task_sampling" else "temperature"
        counts = batches_per_source(sizes, args.batch_size, strategy, 2.0, args.seed, args.steps)
        weights = result.get("learned_task_weights")
        learned = (
            " / ".join(f"{weights[t]:.2f}" for t in ("sentiment", "question_type")) if weights else "- (static 1 / 1)"
        )
        rows.append(
            f"| {sampling} | {weighting} | {counts[0]} / {counts[1]} | "
            f"{counts[1] * args.batch_size / sizes[1]:.1f} | {learned} | "
            f"{fmt(score(result['test'], 'sentiment'))} | {fmt(score(result['test'], 'question_type'))} | "
            f"{result['train_runtime_s']:.0f} |"
        )
    return [
        "## Abundant next to scarce data",
        "",
        f"SST-2 with {args.abundant_samples} training rows next to TREC with {args.scarce_samples}, "
        f"{args.steps} steps of batch {args.batch_size} in every row.",
        "",
        "| task sampling | loss weighting | batches SST-2 / TREC | passes over TREC's rows | "
        "learned weights SST-2 / TREC | SST-2 acc | TREC acc | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def run_transfer(bench: Bench, data_dir: Path, tasks: list) -> list[str]:
    from multitask_st import default_backbone

    pretrained = bench.train("freezing-full", tasks, [])
    random_dir = make_random_init_backbone(
        default_backbone(), bench.output_root / "random-init-all-MiniLM-L6-v2", seed=bench.args.seed
    )
    scratch = bench.train("transfer-random_init", tasks, [], model=str(random_dir))
    return [
        "## Transfer: pretrained vs random initialisation",
        "",
        "Same architecture (BERT, 6 layers, 384 hidden), tokenizer, pooling and budget; only the starting weights "
        "differ. The pretrained row is the `full fine-tuning` run of the freezing table.",
        "",
        f"| encoder weights | SST-2 acc | TREC acc | WikiANN F1 | mean | {COST_HEADER}",
        "|---|---|---|---|---|---|---|---|---|",
        scores_row("all-MiniLM-L6-v2 (pretrained)", pretrained),
        scores_row("same config, random init", scratch),
        "",
    ]


def run_seeds(bench: Bench, tasks: list) -> list[str]:
    seeds = [bench.args.seed, *[int(s) for s in bench.args.extra_seeds.split(",") if s]]
    rows, scores = [], {task: [] for task in NAMES}
    for seed in seeds:
        name = "freezing-full" if seed == bench.args.seed else f"seeds-full-{seed}"
        result = bench.train(name, tasks, [], seed=seed)
        rows.append(scores_row(f"full fine-tuning, seed {seed}", result))
        for task in NAMES:
            scores[task].append(score(result["test"], task))
    spread = " | ".join(f"{max(v) - min(v):.2f}" for v in scores.values())
    return [
        "## Seed-to-seed noise",
        "",
        "The full fine-tuning run of the freezing table repeated with other seeds. `train.py` uses the seed for "
        "everything: head init, dropout, batch order and the seeded subsets (the training rows of every task and "
        "the WikiANN test subset; SST-2 and TREC are scored on their full test sets in every row).",
        "",
        f"| run | SST-2 acc | TREC acc | WikiANN F1 | mean | {COST_HEADER}",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        f"| max - min | {spread} | | | | | |",
        "",
    ]


def samples(args: argparse.Namespace) -> tuple[int, int, int]:
    return args.train_samples, args.eval_samples, args.test_samples


def binomial_noise(accuracy: float, count: int) -> float:
    """One standard error of an accuracy measured on `count` test items, in points."""
    return 100 * math.sqrt(accuracy * (1 - accuracy) / count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("MTL_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--output_root", default=str(ROOT / "outputs" / "bench_training_choices"))
    parser.add_argument("--results", default=None, help="markdown tables (default: <output_root>/results.md)")
    parser.add_argument("--groups", default=",".join(GROUPS[:4]), help=f"comma list of {','.join(GROUPS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--model_name_or_path", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--train_samples", type=int, default=4000, help="training rows kept per task")
    parser.add_argument("--abundant_samples", type=int, default=20000, help="scarce group: SST-2 training rows")
    parser.add_argument("--scarce_samples", type=int, default=300, help="scarce group: TREC training rows")
    parser.add_argument("--eval_samples", type=int, default=500)
    parser.add_argument("--test_samples", type=int, default=2000, help="test rows kept per task (SST-2 has 1,821)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (and of each phase)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--head_learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--extra_seeds", default="43,44", help="seeds group: seeds besides --seed")
    parser.add_argument("--reuse", action="store_true", help="re-read runs already done with the same settings")
    args = parser.parse_args(argv)

    groups = [group for group in args.groups.split(",") if group]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {unknown}; choose from {list(GROUPS)}")
    data_dir = Path(args.data_dir)
    if not (data_dir / "sst2").is_dir():
        print(f"real data not found at {data_dir} (pass --data_dir or set MTL_SHARED_DATA)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.time()
    log(f"groups {groups}; {hardware_line()}")
    bench = Bench(args)
    three_tasks = task_specs(data_dir, NAMES, *samples(args))
    sections: list[str] = []
    for group in groups:
        log(f"group {group}")
        if group == "freezing":
            sections += run_freezing(bench, three_tasks)
        elif group == "heads":
            sections += run_heads(bench, data_dir)
        elif group == "scarce":
            sections += run_scarce(bench, data_dir)
        elif group == "transfer":
            sections += run_transfer(bench, data_dir, three_tasks)
        elif group == "seeds":
            sections += run_seeds(bench, three_tasks)

    command = "python benchmarks/bench_training_choices.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    sst2_n, trec_n = min(1821, args.test_samples), min(500, args.test_samples)
    lines = [
        "# Training choices: measured tables",
        "",
        "Written by `benchmarks/bench_training_choices.py`. Exact command:",
        "",
        f"    {command}",
        "",
        f"Hardware: {hardware_line()}.",
        f"Wall time of this invocation: {time.time() - started:.0f} s ({bench.count} runs trained, "
        f"{len(bench.results) - bench.count} re-read); the {len(bench.results)} runs' own wall times (data loading, "
        f"training, test evaluation) add up to {sum(r.get('wall_s', 0.0) for r in bench.results.values()):.0f} s.",
        "",
        f"Budget: {args.steps} optimizer steps per run (per phase), batch {args.batch_size}, max_seq_length "
        f"{args.max_seq_length}, lr {args.learning_rate} (encoder) / {args.head_learning_rate} (heads), linear decay, "
        f"10% warm-up, weight decay 0.01, seed {args.seed} (one seed per row). {args.train_samples} training rows "
        f"per task unless a table says otherwise (seeded random subsets). Test sets: SST-2 {sst2_n} of 1,821, TREC "
        f"{trec_n} of 500, WikiANN-en {min(10000, args.test_samples)} of 10,000. One standard error of an accuracy "
        f"from test-set size alone: about {binomial_noise(0.85, sst2_n):.1f} points on SST-2 at 85%, "
        f"{binomial_noise(0.9, trec_n):.1f} on TREC at 90% (1 TREC point = {trec_n / 100:.0f} questions).",
        "",
        "Costs: `train time` is the Trainer's train_runtime (training steps only, no data loading or test "
        "evaluation); `params with optimizer state` and `optimizer state` are read from the optimizer after each "
        "step (peak; AdamW keeps two float32 moments per trained parameter).",
        "",
        *sections,
    ]
    results_path = Path(args.results) if args.results else Path(args.output_root) / "results.md"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("\n".join(lines), encoding="utf-8")
    raw = Path(args.output_root) / "results.json"
    raw.write_text(json.dumps(bench.results, indent=2, default=float) + "\n")
    print("\n".join(lines), flush=True)
    log(f"tables written to {results_path}, raw results to {raw}; wall time {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
