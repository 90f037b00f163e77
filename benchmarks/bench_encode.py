"""Encode throughput of MultiTaskModel vs sentence-transformers on all-MiniLM-L6-v2, the opt-in fast modes, the
padding each batching leaves, and a cost model (FLOPs per token, fraction of the CPU's measured peak).

    python benchmarks/bench_encode.py --data_dir ../shared/data [--num_sentences 1024] [--repeats 5]
        [--batch_sizes 1 32 128] [--modes float32 float32-1worker float32-sorted ...] [--threads N]

Both contenders encode the same real sentences (SST-2 validation + STS-B test, shuffled with a fixed seed). Passes
are interleaved A, B, C, A, B, C, ... so background load hits every contender alike; each contender gets one
warm-up pass, and the median of the timed passes is reported with its ratio over the peer's float32 throughput,
measured in the same run. For every fast mode the quality cost is measured too: mean/min cosine to the float32
embeddings, and STS-B test Spearman (cosine vs gold score, 1,379 pairs) against float32's.

Modes (ours):
- `float32`: `model.encode(...)`, the default: must match the peer within 1e-5;
- `float32-1worker`: the same with one batch at a time (`inference_workers = 1`), to show what running batches
  side by side buys;
- `float32-sorted`: the same with padding-bounded batching switched off (`inference_max_padding = 1.0`: batches are
  cut by length order only, as sentence-transformers does), to show what the batching plan buys;
- `bfloat16`: `model.encode(..., precision="bfloat16")`: float32 weights, bfloat16 autocast;
- `bfloat16-weights`: `model.to(torch.bfloat16).encode(...)`: bfloat16 weights (half the memory traffic);
- `float16-weights`: `model.to(torch.float16).encode(...)`: float16 weights (the usual GPU half-precision mode);
- `peer-float16-weights`: sentence-transformers' own model in float16 (`SentenceTransformer(...).half()`), the
  peer a GPU user would compare float16 against;
- `int8`: the exported graph in int8 through onnxruntime (`OnnxMultiTaskModel.from_pretrained(folder, int8=True)`,
  docs/ONNX.md; CPU). `benchmarks/bench_onnx.py` compares the ONNX paths with sentence-transformers' own backends.

On CPU, ours runs batches side by side on worker threads (`MultiTaskModel.inference_workers`); every batch,
including the batch-size-1 ones, is still one forward pass over exactly those sentences. The latency table times
single sentences, one call each, where no such overlap is possible.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = (
    "float32",
    "float32-1worker",
    "float32-sorted",
    "bfloat16",
    "bfloat16-weights",
    "float16-weights",
    "peer-float16-weights",
    "int8",
)


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


def with_knobs(model, **knobs):
    """A shallow copy of `model` (the same weights) with inference settings such as `inference_workers` changed."""
    variant = copy.copy(model)
    for name, value in knobs.items():
        setattr(variant, name, value)
    return variant


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


class PeerEncoder:
    """sentence-transformers' `encode` behind the call ours has (`precision` here means ours' autocast)."""

    def __init__(self, model):
        self.model = model

    def encode(self, texts, batch_size: int = 32, precision: str | None = None):
        # float32 out, as ours: the quality table's norms and cosines are not to be computed in float16
        return np.asarray(self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True), dtype=np.float32)


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("Flags"))
        extras = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if flag in flags]
        return f"{name} [{' '.join(extras)}]"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_machine() -> str:
    import sentence_transformers
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"CPU {cpu_name()} ({os.cpu_count()} logical cores), torch threads {torch.get_num_threads()}, GPU {gpu}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}, python {platform.python_version()}"
    )


# ----------------------------------------------------------------------------------------------- cost model


def flops_per_token(config, sequence_length: float) -> float:
    """Forward FLOPs per token of a BERT-style encoder (2 per multiply-add): the four attention projections and
    the two feed-forward matrices, plus the attention scores and weighted sum (which grow with the length)."""
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    dense = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 2 * 2 * sequence_length * hidden
    return layers * (dense + attention)


def measured_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """float32 GEMM throughput of this CPU with the current threads: the ceiling encode's matmuls can reach."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def padding_table(model, peer, corpus: list[str], batch_sizes: list[int]) -> list[tuple]:
    """Tokens each batching feeds the encoder (padding included) per real token, and the number of batches."""
    from modeling_mtl import plan_batches

    ids = model.tokenizer(corpus, truncation=True, max_length=model.config.max_seq_length)["input_ids"]
    lengths = np.array([len(row) for row in ids])
    rows = []
    for batch_size in batch_sizes:
        plans = {
            "ours (plan_batches, 10%)": plan_batches(lengths, batch_size, model.inference_max_padding),
            "ours, length order only": plan_batches(lengths, batch_size, 1.0),
        }
        # sentence-transformers: sorted by character length (longest first), fixed-size batches, each padded to
        # its longest row after tokenisation.
        order = np.argsort([-len(text) for text in corpus], kind="stable")
        plans["sentence-transformers"] = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        unsorted = np.arange(len(corpus))
        plans["no sorting"] = [unsorted[i : i + batch_size] for i in range(0, len(corpus), batch_size)]
        for name, batches in plans.items():
            executed = sum(len(batch) * lengths[batch].max() for batch in batches)
            rows.append((batch_size, name, len(batches), executed / lengths.sum()))
    return rows, lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("MTL_SHARED_DATA", "../shared/data")))
    parser.add_argument("--num_sentences", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=MODES,
        help="default: all but the float16 ones on a CPU, all but int8 on a GPU",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--skip_quality", action="store_true", help="skip the STS-B Spearman of each mode")
    parser.add_argument("--latency_sentences", type=int, default=200, help="sentences timed one call each")
    parser.add_argument(
        "--profile_batch_size",
        type=int,
        default=None,
        help="only profile ours (float32, cProfile, top functions by own time) at this batch size, then exit",
    )
    args = parser.parse_args(argv)
    if args.modes is None:
        on_cpu = args.device == "cpu"
        gpu_only = ("float16-weights", "peer-float16-weights")  # float16 matmuls are slow on CPUs
        args.modes = [mode for mode in MODES if (mode not in gpu_only if on_cpu else mode != "int8")]
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone

    print(describe_machine())
    print("command: python benchmarks/bench_encode.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    corpus = load_corpus(args.data_dir)[: args.num_sentences]
    print(f"{len(corpus)} sentences")
    peer = SentenceTransformer(str(default_backbone()), device=args.device)
    model = MultiTaskModel.from_backbone(default_backbone()).to(args.device).eval()

    if args.profile_batch_size:
        import cProfile
        import pstats

        model.inference_workers = 1  # cProfile sees only this thread: keep every batch on it
        model.encode(corpus[:64], batch_size=args.profile_batch_size)  # warm-up
        profiler = cProfile.Profile()
        profiler.enable()
        model.encode(corpus, batch_size=args.profile_batch_size)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
        return 0

    variants: dict[str, tuple] = {}  # mode -> (model, precision)
    for mode in args.modes:
        if mode == "float32":
            variants[mode] = (model, None)
        elif mode == "float32-1worker":
            variants[mode] = (with_knobs(model, inference_workers=1), None)
        elif mode == "float32-sorted":
            variants[mode] = (with_knobs(model, inference_max_padding=1.0), None)
        elif mode == "bfloat16":
            variants[mode] = (model, "bfloat16")
        elif mode == "bfloat16-weights":
            variants[mode] = (copy.deepcopy(model).to(torch.bfloat16), None)
        elif mode == "float16-weights":
            variants[mode] = (copy.deepcopy(model).to(torch.float16), None)
        elif mode == "peer-float16-weights":
            variants[mode] = (PeerEncoder(copy.deepcopy(peer).half()), None)
        elif mode == "int8":
            if args.device != "cpu":
                print("int8: onnxruntime on the CPU only, skipped")
                continue
            import tempfile

            from multitask_st.onnx import OnnxMultiTaskModel, export_onnx

            folder = export_onnx(model, Path(tempfile.mkdtemp(prefix="bench_encode_onnx_")), int8=True)
            variants[mode] = (OnnxMultiTaskModel.from_pretrained(folder, int8=True), None)

    reference = model.encode(corpus, batch_size=32)
    peer_embeddings = peer.encode(corpus, batch_size=32, convert_to_numpy=True)
    print(f"\nfloat32 max |ours - sentence-transformers| = {np.abs(reference - peer_embeddings).max():.2e}")

    print("\n## Throughput (sentences/s; ratio = ours / sentence-transformers float32, same run)\n")
    print("| batch size | sentence-transformers | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for batch_size in args.batch_sizes:
        contenders = {"peer": lambda bs=batch_size: peer.encode(corpus, batch_size=bs)}
        for mode, (variant, precision) in variants.items():
            contenders[mode] = lambda v=variant, p=precision, bs=batch_size: v.encode(
                corpus, batch_size=bs, precision=p
            )
        medians = interleaved(contenders, args.repeats)
        theirs = len(corpus) / medians["peer"]
        cells = []
        for mode in variants:
            ours = len(corpus) / medians[mode]
            cells.append(f"{ours:.1f} ({ours / theirs:.2f}x)")
        print(f"| {batch_size} | {theirs:.1f} | " + " | ".join(cells) + " |", flush=True)

    print("\n## Single-sentence latency (one `encode(sentence)` call per sentence; median and p90 in ms)\n")
    latency_texts = corpus[: args.latency_sentences]
    calls = {"peer": lambda text: peer.encode([text])}
    for mode, (variant, precision) in variants.items():
        if mode not in ("float32-sorted", "float32-1worker"):  # one sentence: one batch, nothing to differ
            calls[mode] = lambda text, v=variant, p=precision: v.encode([text], precision=p)
    samples = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call(latency_texts[0])
    for text in latency_texts:  # interleaved per sentence
        for name, call in calls.items():
            start = time.perf_counter()
            call(text)
            samples[name].append(1000 * (time.perf_counter() - start))
    print("| contender | median ms | p90 ms | ratio (peer median / median) |")
    print("|---|---|---|---|")
    peer_median = statistics.median(samples["peer"])
    for name, values in samples.items():
        median, p90 = statistics.median(values), float(np.percentile(values, 90))
        label = "sentence-transformers" if name == "peer" else name
        print(f"| {label} | {median:.2f} | {p90:.2f} | {peer_median / median:.2f}x |", flush=True)

    print("\n## Quality of each mode\n")
    print("| mode | mean cosine to float32 | min cosine | STS-B test Spearman | delta vs float32 |")
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
        if mode == "float32":
            base = spearman
        delta = spearman - base if base is not None else float("nan")
        print(f"| {mode} | {cosine.mean():.4f} | {cosine.min():.4f} | {spearman:.2f} | {delta:+.2f} |", flush=True)

    print("\n## Padding: tokens run through the encoder per real token\n")
    rows, lengths = padding_table(model, peer, corpus, args.batch_sizes)
    print("| batch size | batching | batches | executed / real tokens |")
    print("|---|---|---|---|")
    for batch_size, name, count, ratio in rows:
        print(f"| {batch_size} | {name} | {count} | {ratio:.2f} |")

    print("\n## Padding tolerance (float32 sentences/s by `inference_max_padding`; 1.0 = sorted only)\n")
    tolerances = (0.0, 0.1, 0.2, 1.0)
    print("| batch size | " + " | ".join(f"{t:.0%}" for t in tolerances) + " |")
    print("|---|" + "---|" * len(tolerances))
    for batch_size in [size for size in args.batch_sizes if size > 1]:
        contenders = {}
        for tolerance in tolerances:
            variant = with_knobs(model, inference_max_padding=tolerance)
            contenders[tolerance] = lambda v=variant, bs=batch_size: v.encode(corpus, batch_size=bs)
        medians = interleaved(contenders, 3)
        print(f"| {batch_size} | " + " | ".join(f"{len(corpus) / medians[t]:.1f}" for t in tolerances) + " |")

    if args.device != "cpu":  # the cost model below compares against this CPU's GEMM peak
        return 0
    print("\n## Cost model\n")
    config = model.config.backbone_config
    mean_length = float(lengths.mean())
    per_token = flops_per_token(config, mean_length)
    peak = measured_peak_gflops()
    print(
        f"- backbone: {config.num_hidden_layers} layers, hidden {config.hidden_size}, FFN {config.intermediate_size}: "
        f"{flops_per_token(config, 0) / 1e6:.1f} MFLOP per token in the dense layers, "
        f"{per_token / 1e6:.1f} MFLOP per token with attention at the corpus mean length ({mean_length:.1f} tokens)"
    )
    print(f"- measured float32 GEMM peak (2048x2048, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    useful = sum(flops_per_token(config, length) * length for length in lengths)
    print("\n| batch size | mode | useful GFLOP/s | fraction of GEMM peak |")
    print("|---|---|---|---|")
    for batch_size in args.batch_sizes:
        for mode in ("float32", "float32-1worker", "float32-sorted"):
            if mode not in variants:
                continue
            variant, precision = variants[mode]
            seconds = interleaved({mode: lambda v=variant, bs=batch_size: v.encode(corpus, batch_size=bs)}, 3)[mode]
            print(f"| {batch_size} | {mode} | {useful / seconds / 1e9:.1f} | {useful / seconds / 1e9 / peak:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
