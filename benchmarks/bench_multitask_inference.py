"""What serving three tasks costs: one multi-task `predict` vs `encode` alone vs three single-task models.

    python benchmarks/bench_multitask_inference.py --data_dir ../shared/data [--num_sentences 1024]
        [--batch_sizes 32 128] [--repeats 5] [--threads N]

One all-MiniLM-L6-v2 encoder with three heads (sentiment: 2 classes, question type: 6 classes, NER: 7 BIO tags per
word) answers all three tasks from one encoder pass per batch. The alternative is one fine-tuned model per task:
three encoders, three passes. Heads are freshly initialised (their outputs do not matter for timing; their cost
does). All contenders read the same real sentences (SST-2 validation + STS-B test, as bench_encode.py); passes
are interleaved after a warm-up and medians reported. Targets from the issue: predict(3 tasks) <= 1.1x encode,
and about 3x less time than three single-task models.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_encode import describe_machine, interleaved, load_corpus  # noqa: E402

TASKS = [
    {"name": "sentiment", "labels": ["negative", "positive"]},
    {"name": "question_type", "labels": ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]},
    {
        "name": "ner",
        "type": "token_classification",
        "labels": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"],
    },
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("MTL_SHARED_DATA", "../shared/data")))
    parser.add_argument("--num_sentences", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone

    print(describe_machine())
    print(
        "command: python benchmarks/bench_multitask_inference.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    corpus = load_corpus(args.data_dir)[: args.num_sentences]
    torch.manual_seed(0)
    multitask = MultiTaskModel.from_backbone(default_backbone(), tasks=TASKS).eval()
    singles = [MultiTaskModel.from_backbone(default_backbone(), tasks=[task]).eval() for task in TASKS]

    print(f"{len(corpus)} sentences; heads: " + ", ".join(f"{t['name']} ({len(t['labels'])})" for t in TASKS))
    print("\n| batch size | encode (s) | predict, 3 tasks, 1 model (s) | 3 single-task models (s) |", end="")
    print(" predict / encode | 3 models / predict |")
    print("|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        contenders = {
            "encode": lambda bs=batch_size: multitask.encode(corpus, batch_size=bs),
            "predict": lambda bs=batch_size: multitask.predict(corpus, batch_size=bs),
            "singles": lambda bs=batch_size: [single.predict(corpus, batch_size=bs) for single in singles],
        }
        medians = interleaved(contenders, args.repeats)
        print(
            f"| {batch_size} | {medians['encode']:.2f} | {medians['predict']:.2f} | {medians['singles']:.2f} | "
            f"{medians['predict'] / medians['encode']:.2f}x | {medians['singles'] / medians['predict']:.2f}x |",
            flush=True,
        )
    heads = sum(p.numel() for name, p in multitask.named_parameters() if not name.startswith("backbone."))
    encoder = sum(p.numel() for name, p in multitask.named_parameters() if name.startswith("backbone."))
    print(f"\nparameters: encoder {encoder / 1e6:.2f}M, three heads together {heads / 1e3:.1f}k; ", end="")
    print(f"three single-task models {3 * encoder / 1e6:.2f}M encoder parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
