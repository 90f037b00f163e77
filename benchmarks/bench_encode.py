"""Encode throughput of MultiTaskModel vs sentence-transformers on all-MiniLM-L6-v2, plus opt-in fast modes.

    python benchmarks/bench_encode.py --data_dir ../shared/data [--num_sentences 512] [--repeats 3]
        [--batch_sizes 1 32 128] [--modes float32 int8 bfloat16]

Both contenders encode the same real sentences (SST-2 validation + STS-B test, shuffled with a fixed seed). Passes
are interleaved A, B, A, B, ... so background load on a shared machine hits both alike; the median of the timed
passes (after one warm-up each) is reported with the ratio over the peer. For every fast mode the quality cost is
measured too: mean/min cosine to the float32 embeddings and STS-B test Spearman (cosine vs gold score).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def load_corpus(data_dir: Path, seed: int = 0) -> list[str]:
    sentences = [row["sentence"] for row in read_jsonl(data_dir / "sst2" / "validation.jsonl")]
    for row in read_jsonl(data_dir / "stsb" / "test.jsonl"):
        sentences += [row["sentence1"], row["sentence2"]]
    random.Random(seed).shuffle(sentences)
    return sentences


def stsb_spearman(encode, data_dir: Path) -> float:
    rows = read_jsonl(data_dir / "stsb" / "test.jsonl")
    a = encode([row["sentence1"] for row in rows])
    b = encode([row["sentence2"] for row in rows])
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(spearmanr(cosine, [row["score"] for row in rows]).statistic) * 100


def interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds per pass for each contender, passes interleaved round-robin after one warm-up each."""
    for run in contenders.values():
        run()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import sentence_transformers
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"CPU {cpu} ({os.cpu_count()} logical cores), torch threads {torch.get_num_threads()}, GPU {gpu}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}, python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("MTL_SHARED_DATA", "../shared/data")))
    parser.add_argument("--num_sentences", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--modes", nargs="+", default=["float32", "int8"], choices=["float32", "int8", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip_quality", action="store_true", help="skip the STS-B Spearman of each mode")
    args = parser.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone

    print(describe_machine())
    corpus = load_corpus(args.data_dir)[: args.num_sentences]
    peer = SentenceTransformer(str(default_backbone()), device=args.device)
    model = MultiTaskModel.from_backbone(default_backbone()).to(args.device).eval()
    variants = {}
    for mode in args.modes:
        if mode == "int8":
            if args.device != "cpu":
                print("int8: dynamic quantisation is CPU-only, skipped")
                continue
            variants[mode] = (model.quantize_dynamic(), "float32")
        else:
            variants[mode] = (model, mode)

    reference = model.encode(corpus, batch_size=32)
    peer_embeddings = peer.encode(corpus, batch_size=32, convert_to_numpy=True)
    print(f"float32 max |ours - sentence-transformers| = {np.abs(reference - peer_embeddings).max():.2e}")

    print("\n| mode | batch size | ours (sent/s) | sentence-transformers (sent/s) | ratio |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        contenders = {"peer": lambda bs=batch_size: peer.encode(corpus, batch_size=bs)}
        for mode, (variant, precision) in variants.items():
            contenders[mode] = lambda v=variant, p=precision, bs=batch_size: v.encode(
                corpus, batch_size=bs, precision=p
            )
        medians = interleaved(contenders, args.repeats)
        for mode in variants:
            ours, theirs = len(corpus) / medians[mode], len(corpus) / medians["peer"]
            print(f"| {mode} | {batch_size} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |", flush=True)

    print("\n| mode | mean cosine to float32 | min cosine | STS-B test Spearman | delta vs float32 |")
    print("|---|---|---|---|---|")
    base = None
    for mode, (variant, precision) in variants.items():
        embeddings = variant.encode(corpus, batch_size=32, precision=precision)
        cosine = (embeddings * reference).sum(1) / (
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
        )
        spearman = float("nan")
        if not args.skip_quality:
            spearman = stsb_spearman(
                lambda t, v=variant, p=precision: v.encode(t, batch_size=64, precision=p), args.data_dir
            )
        base = spearman if mode == "float32" else base
        delta = spearman - base if base is not None else float("nan")
        print(f"| {mode} | {cosine.mean():.4f} | {cosine.min():.4f} | {spearman:.2f} | {delta:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
