"""Training throughput (examples/s) of MultiTaskTrainer + MultiTaskModel against the stock `transformers.Trainer`
with `AutoModelForSequenceClassification`, same backbone, same SST-2 rows, same hyperparameters, same run.

    python benchmarks/bench_training_throughput.py --data_dir ../shared/data [--steps 40 --warmup_steps 5]
        [--repeats 3] [--batch_size 32] [--threads N] [--bf16]

- `stock`: `AutoModelForSequenceClassification.from_pretrained(all-MiniLM-L6-v2, num_labels=2)`, rows tokenised
  with `datasets.map`, `DataCollatorWithPadding`, `Trainer`.
- `multitask-<protection>`: `MultiTaskModel.from_backbone(all-MiniLM-L6-v2, tasks=[sentiment])`, rows prepared by
  this project's `build_datasets` (the code `train.py` runs), `MultiTaskCollator`, `MultiTaskTrainer` with its task
  sampler, and the embedding protection `none`, `distillation` (the default: one extra forward pass of a frozen
  copy of the initial encoder, without gradients) or `l2sp` (a penalty over the encoder's weights). With `none`,
  the only intended difference from `stock` is the head: mean pooling + linear vs BERT's pooler (dense + tanh on
  [CLS]) + linear; both cost one encoder pass.

Each repeat trains each contender for `--warmup_steps + --steps` optimizer steps (AdamW, no evaluation, no
checkpoints; passes interleaved stock, multitask, stock, ...). A `TrainerCallback` stamps every step's end; the
throughput of a pass is `steps x batch_size / (time of the last step - time of the last warm-up step)`, so model
loading, data preparation and the first slow steps are left out. The median over repeats is reported, with
padded tokens/s (both see the same length distribution, but not the same batches: the samplers differ) and the
ratio multitask / stock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


class TokenCounter:
    """Wraps a data collator and counts the padded tokens it hands to the model."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens.append(int(batch["input_ids"].numel()))
        return batch


def training_arguments(args: argparse.Namespace, output_dir: Path, seed: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=5e-5,
        weight_decay=0.01,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10_000,
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        disable_tqdm=True,
    )


def load_rows(args: argparse.Namespace):
    from datasets import load_dataset

    path = Path(args.data_dir) / "sst2" / "train.jsonl"
    if not path.is_file():
        raise SystemExit(f"SST-2 not found at {path}: pass --data_dir (the folder holding sst2/train.jsonl)")
    return str(path), load_dataset("json", data_files=str(path), split=f"train[:{args.train_samples}]")


def make_stock(args: argparse.Namespace, backbone: str, rows, seed: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
    data = rows.map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=args.max_seq_length),
        batched=True,
        remove_columns=["sentence", "idx"] if "idx" in rows.column_names else ["sentence"],
    )
    collator = TokenCounter(DataCollatorWithPadding(tokenizer))
    clock = StepClock()
    trainer = Trainer(
        model=model,
        args=training_arguments(args, Path(args.output_root) / "stock", seed),
        train_dataset=data,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    return trainer, clock, collator


def make_multitask(args: argparse.Namespace, backbone: str, data_file: str, seed: int, protection: str = "none"):
    from modeling_mtl import MultiTaskModel
    from multitask_st.data import MultiTaskCollator, build_datasets, parse_task_specs
    from multitask_st.trainer import MultiTaskTrainer

    spec = {
        "name": "sentiment",
        "type": "classification",
        "data_files": {"train": data_file},
        "text_column": "sentence",
        "label_column": "label",
        "labels": ["negative", "positive"],
        "train_split": f"train[:{args.train_samples}]",  # the same rows as `stock`
        "eval_split": None,
    }
    specs = parse_task_specs([spec])
    model = MultiTaskModel.from_backbone(backbone, tasks=[specs[0].model_task()], max_seq_length=args.max_seq_length)
    data = build_datasets(specs, model.tokenizer, args.max_seq_length, seed=seed, do_eval=False)
    collator = TokenCounter(MultiTaskCollator(model.tokenizer, model.config.tasks))
    clock = StepClock()
    trainer = MultiTaskTrainer(
        model=model,
        args=training_arguments(args, Path(args.output_root) / "multitask", seed),
        train_dataset=data.train,
        data_collator=collator,
        processing_class=model.tokenizer,
        callbacks=[clock],
        source_sizes=data.source_sizes,
        embedding_protection=protection,
        drift_sample_size=0,
    )
    return trainer, clock, collator


def timed_pass(trainer, clock, collator, args: argparse.Namespace) -> dict[str, float]:
    trainer.train()
    stamps = clock.stamps
    if len(stamps) != args.warmup_steps + args.steps:
        raise RuntimeError(f"expected {args.warmup_steps + args.steps} step stamps, got {len(stamps)}")
    elapsed = stamps[-1] - stamps[args.warmup_steps - 1]
    # The collator runs one batch ahead of the step (the dataloader prefetches), so count the batches of the
    # timed steps by position: batches warmup .. warmup+steps-1.
    tokens = sum(collator.tokens[args.warmup_steps : args.warmup_steps + args.steps])
    return {"examples_per_s": args.steps * args.batch_size / elapsed, "tokens_per_s": tokens / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("MTL_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--model_name_or_path", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--train_samples", type=int, default=4096)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per pass")
    parser.add_argument("--warmup_steps", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (accelerate's autocast)")
    parser.add_argument("--output_root", default="/tmp/bench_training_throughput")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=["stock", "multitask-none", "multitask-distillation", "multitask-l2sp"],
        choices=["stock", "multitask-none", "multitask-distillation", "multitask-l2sp"],
    )
    args = parser.parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup_steps and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from bench_encode import describe_machine
    from transformers.utils import logging as hf_logging

    from multitask_st import default_backbone

    hf_logging.set_verbosity_error()
    backbone = args.model_name_or_path or str(default_backbone())
    data_file, rows = load_rows(args)
    print(describe_machine())
    print("command: python benchmarks/bench_training_throughput.py " + " ".join(argv or sys.argv[1:]))
    print(
        f"{len(rows)} SST-2 training rows, batch {args.batch_size}, max length {args.max_seq_length}, "
        f"{args.warmup_steps} warm-up + {args.steps} timed steps per pass, {args.repeats} passes each, "
        f"device {args.device}{', bf16' if args.bf16 else ''}"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.contenders}
    for repeat in range(args.repeats):
        for name in results:
            if name == "stock":
                trainer, clock, collator = make_stock(args, backbone, rows, seed=repeat)
            else:
                protection = name.split("-", 1)[1]
                trainer, clock, collator = make_multitask(args, backbone, data_file, seed=repeat, protection=protection)
            figures = timed_pass(trainer, clock, collator, args)
            results[name].append(figures)
            print(f"pass {repeat + 1} {name}: {figures['examples_per_s']:.1f} examples/s", flush=True)
            del trainer
    median = {
        name: {key: statistics.median(run[key] for run in runs) for key in ("examples_per_s", "tokens_per_s")}
        for name, runs in results.items()
    }
    reference = median.get("stock") or next(iter(median.values()))
    plain = median.get("multitask-none") or reference
    titles = {
        "stock": "`Trainer` + `AutoModelForSequenceClassification`",
        "multitask-none": "`MultiTaskTrainer` + `MultiTaskModel`, no protection",
        "multitask-distillation": "... + distillation (default)",
        "multitask-l2sp": "... + L2-SP",
    }
    print()
    print("| trainer + model | examples/s (median) | padded tokens/s | ratio vs stock | ratio vs no protection |")
    print("|---|---|---|---|---|")
    for name, figures in median.items():
        print(
            f"| {titles[name]} | {figures['examples_per_s']:.1f} | {figures['tokens_per_s']:.0f} | "
            f"{figures['examples_per_s'] / reference['examples_per_s']:.2f}x | "
            f"{figures['examples_per_s'] / plain['examples_per_s']:.2f}x |"
        )
    ratio = {name: figures["examples_per_s"] / reference["examples_per_s"] for name, figures in median.items()}
    if args.json:
        Path(args.json).write_text(json.dumps({"passes": results, "median": median, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
