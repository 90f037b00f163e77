"""Single-sentence latency, throughput at batch 32 and 128, and quality of this project's ONNX backend against
sentence-transformers' backends, in one run on the same sentences (docs/ONNX.md).

    bash benchmarks/setup_peer_venv.sh        # once: .venv-peer (sentence-transformers 5.1.2, optimum-onnx, OpenVINO)
    python benchmarks/bench_onnx.py --data_dir ../shared/data --output onnx_benchmark.md

Contenders, all on the all-MiniLM-L6-v2 files of `multitask_st.default_backbone()`:
- the peer, sentence-transformers 5.1.2 in `.venv-peer` (run by `peer_encode.py` in a subprocess, because its
  optimum-onnx needs transformers < 4.58): `st-torch` (PyTorch), `st-onnx` (its ONNX export), `st-onnx-O3`
  (optimum's O3 graph optimisation: fusions and approximate GELU), `st-onnx-qint8` (optimum's dynamic int8
  configuration for this CPU: avx512_vnni, avx512 or avx2) and `st-openvino` (when OpenVINO installed);
- this project: `torch-fp32` (`MultiTaskModel.encode`), `torch-bf16` (`model.to(torch.bfloat16)`), `onnx-fp32` and
  `onnx-int8` (`OnnxMultiTaskModel`, int8 = the default "outlier-split" scheme); extra modes on request:
  `onnx-int8-per-channel` (the same without the float32 outlier channels), `onnx-int8-2workers` (two batches side
  by side on one session).

Measured, contender after contender in rotation so that background load hits all alike (after a warm-up each):
- single-sentence latency: `encode([sentence])` per call, over `--latency_sentences` sentences, rotated in chunks of
  `--chunk` sentences; median and 90th percentile in ms;
- throughput: one `encode(sentences, batch_size=B)` pass over the `--num_sentences` corpus per round, `--repeats`
  rounds; sentences/s of the median pass;
- quality: STS-B test Spearman (cosine vs gold, 1,379 pairs, encoded at batch size 32) and the mean/min cosine of
  each contender's embeddings of those 2,758 sentences to this project's float32 PyTorch embeddings.
The table gives each figure with its ratio to the fastest peer of that column (> 1: faster than every peer).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_encode import cpu_name, load_corpus, read_jsonl  # noqa: E402

PEERS = ("st-torch", "st-onnx", "st-onnx-O3", "st-onnx-qint8", "st-openvino")
OURS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
EXTRA_OURS = ("onnx-int8-per-channel", "onnx-int8-2workers")
QUALITY_DROP = 0.3  # STS-B points a mode may lose and still count as keeping quality (the bound)


# ---------------------------------------------------------------------------------------------- the peer process


class PeerProcess:
    """`peer_encode.py` in the peer venv, spoken to in JSON lines; timings are taken inside it."""

    def __init__(self, python: Path, peers: list[str], model_dir: str, work_dir: Path, threads: int, sentences: Path):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        env.pop("PYTHONPATH", None)  # nothing of this project's environment leaks into the peer's
        self.process = subprocess.Popen(
            [str(python), str(Path(__file__).resolve().parent / "peer_encode.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        reply = self.call(
            op="setup",
            model_dir=model_dir,
            work_dir=str(work_dir),
            peers=peers,
            threads=threads,
            sentences=str(sentences),
        )
        self.peers, self.skipped = reply["peers"], reply["skipped"]
        self.versions, self.files, self.quantization = reply["versions"], reply["files"], reply["quantization"]

    def call(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer process exited (code {self.process.poll()}); its errors are above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peer {request.get('peer', '')} {request['op']}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call(op="quit")
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Contender:
    """One way to encode: `latency(start, stop)` -> seconds per call, `run(batch_size, limit)` -> seconds of one
    pass, `embed(texts)` -> embeddings."""

    def __init__(self, name: str, peer: bool, latency, run, embed):
        self.name, self.peer = name, peer
        self.latency, self.run, self.embed = latency, run, embed


def peer_contender(process: PeerProcess, name: str, work_dir: Path) -> Contender:
    def embed(texts: list[str]) -> np.ndarray:
        texts_path, out = work_dir / "embed_texts.json", work_dir / f"embed_{name}.npy"
        texts_path.write_text(json.dumps(texts), encoding="utf-8")
        process.call(op="embed", peer=name, texts=str(texts_path), out=str(out), batch_size=32)
        return np.load(out)

    return Contender(
        name,
        True,
        lambda start, stop: process.call(op="latency", peer=name, start=start, stop=stop)["seconds"],
        lambda batch_size, limit: process.call(op="pass", peer=name, batch_size=batch_size, limit=limit)["seconds"],
        embed,
    )


def our_contender(name: str, model, sentences: list[str]) -> Contender:
    def latency(start: int, stop: int) -> list[float]:
        seconds = []
        for sentence in sentences[start:stop]:
            began = time.perf_counter()
            model.encode([sentence])
            seconds.append(time.perf_counter() - began)
        return seconds

    def run(batch_size: int, limit: int | None) -> float:
        texts = sentences[: limit or len(sentences)]
        began = time.perf_counter()
        model.encode(texts, batch_size=batch_size)
        return time.perf_counter() - began

    return Contender(name, False, latency, run, lambda texts: model.encode(texts, batch_size=32))


def build_ours(modes: list[str], work_dir: Path, threads: int) -> tuple[dict, dict]:
    """This project's contenders, and a description of the export (what docs/ONNX.md quotes)."""
    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone
    from multitask_st.onnx import (
        OnnxMultiTaskModel,
        calibration_feeds,
        default_calibration_texts,
        export_onnx,
        quantize_int8,
    )

    model = MultiTaskModel.from_backbone(default_backbone()).eval()
    models: dict = {}
    info: dict = {}
    if "torch-fp32" in modes:
        models["torch-fp32"] = model
    if "torch-bf16" in modes:
        models["torch-bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    if any(mode.startswith("onnx") for mode in modes):
        started = time.perf_counter()
        folder = export_onnx(model, work_dir / "ours", int8=any(mode.startswith("onnx-int8") for mode in modes))
        info["export_seconds"] = round(time.perf_counter() - started, 1)
        info["description"] = json.loads((folder / "onnx_config.json").read_text())
        if "onnx-fp32" in modes:
            models["onnx-fp32"] = OnnxMultiTaskModel.from_pretrained(folder, threads=threads)
        if "onnx-int8" in modes:
            models["onnx-int8"] = OnnxMultiTaskModel.from_pretrained(folder, int8=True, threads=threads)
        if "onnx-int8-2workers" in modes:
            two = OnnxMultiTaskModel.from_pretrained(folder, int8=True, threads=threads)
            two.inference_workers = 2
            models["onnx-int8-2workers"] = two
        if "onnx-int8-per-channel" in modes:
            feeds = calibration_feeds(model.tokenizer, default_calibration_texts(), model.config.max_seq_length)
            quantize_int8(folder / "model.onnx", folder / "model_int8_per_channel.onnx", "per-channel", feeds)
            models["onnx-int8-per-channel"] = OnnxMultiTaskModel.from_pretrained(
                folder, threads=threads, file_name="model_int8_per_channel.onnx"
            )
    return models, info


# ---------------------------------------------------------------------------------------------- measuring


def measure_latency(contenders: list[Contender], count: int, chunk: int, warmup: int) -> dict[str, list[float]]:
    for contender in contenders:
        contender.latency(0, warmup)
    seconds: dict[str, list[float]] = {contender.name: [] for contender in contenders}
    for start in range(0, count, chunk):
        for contender in contenders:
            seconds[contender.name] += contender.latency(start, min(start + chunk, count))
    return seconds


def measure_throughput(contenders: list[Contender], batch_size: int, repeats: int, limit: int) -> dict[str, float]:
    for contender in contenders:
        contender.run(batch_size, min(limit, 4 * batch_size))  # warm-up: graphs, arenas, thread pools
    seconds: dict[str, list[float]] = {contender.name: [] for contender in contenders}
    for _ in range(repeats):
        for contender in contenders:
            seconds[contender.name].append(contender.run(batch_size, limit))
    return {name: limit / statistics.median(values) for name, values in seconds.items()}


def measure_quality(contenders: list[Contender], reference: np.ndarray, texts: list[str], gold: list[float]) -> dict:
    pairs = len(gold)
    quality = {}
    for contender in contenders:
        vectors = np.asarray(contender.embed(texts), dtype=np.float64)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        cosines = (vectors * reference).sum(1)
        spearman = spearmanr((vectors[:pairs] * vectors[pairs:]).sum(1), gold).statistic * 100
        quality[contender.name] = {
            "spearman": float(spearman),
            "mean_cosine": float(cosines.mean()),
            "min_cosine": float(cosines.min()),
        }
    return quality


# ---------------------------------------------------------------------------------------------- report


def ratio(value: float, best_peer: float | None, higher_is_better: bool) -> str:
    if best_peer is None or not value:
        return ""
    factor = value / best_peer if higher_is_better else best_peer / value
    return f" ({factor:.2f}x)"


def report(names, peers, latency, throughput, quality, batch_sizes) -> tuple[str, list[str]]:
    medians = {name: statistics.median(values) * 1000 for name, values in latency.items()}
    p90 = {name: float(np.percentile(values, 90)) * 1000 for name, values in latency.items()}
    best_latency = min((medians[n] for n in peers if n in medians), default=None)
    best_throughput = {
        size: max((throughput[size][n] for n in peers if n in throughput[size]), default=None) for size in batch_sizes
    }
    reference = quality.get("torch-fp32", {}).get("spearman")
    header = ["contender", "latency median ms (p90)"] + [f"batch {size} sentences/s" for size in batch_sizes]
    header += ["STS-B Spearman (delta)", "mean / min cosine to fp32"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        row = [f"{name}{' (peer)' if name in peers else ''}"]
        row.append(
            f"{medians[name]:.2f} ({p90[name]:.2f}){ratio(medians[name], best_latency, False)}"
            if name in medians
            else "-"
        )
        for size in batch_sizes:
            value = throughput[size].get(name)
            row.append(f"{value:.0f}{ratio(value, best_throughput[size], True)}" if value else "-")
        q = quality.get(name)
        if q:
            delta = f" ({q['spearman'] - reference:+.2f})" if reference is not None else ""
            row += [f"{q['spearman']:.2f}{delta}", f"{q['mean_cosine']:.4f} / {q['min_cosine']:.4f}"]
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    verdicts = []
    keeps = [n for n in names if n not in peers and reference is not None and n in quality]
    keeps = [n for n in keeps if quality[n]["spearman"] >= reference - QUALITY_DROP]
    if best_latency and keeps:
        best = min((n for n in keeps if n in medians), key=lambda n: medians[n], default=None)
        if best:
            verdicts.append(
                f"batch 1: fastest of ours within {QUALITY_DROP} STS-B points is {best}, "
                f"{best_latency / medians[best]:.2f}x the fastest peer (target >= 1.0x)"
            )
    for size in batch_sizes:
        if best_throughput[size] and keeps:
            best = max((n for n in keeps if n in throughput[size]), key=lambda n: throughput[size][n], default=None)
            if best:
                verdicts.append(
                    f"batch {size}: fastest of ours within {QUALITY_DROP} STS-B points is {best}, "
                    f"{throughput[size][best] / best_throughput[size]:.2f}x the fastest peer (target >= 1.5x)"
                )
    return "\n".join(lines), verdicts


def describe_machine(threads: int) -> str:
    import onnxruntime
    import transformers

    return (
        f"CPU {cpu_name()} ({os.cpu_count()} logical cores), threads {threads}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("MTL_SHARED_DATA", "../shared/data")))
    parser.add_argument("--num_sentences", type=int, default=None, help="corpus size (default: all, ~3,630)")
    parser.add_argument("--latency_sentences", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=20, help="latency sentences per contender turn")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per contender and batch size")
    parser.add_argument("--ours", nargs="+", default=list(OURS), choices=OURS + EXTRA_OURS)
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--no_peer", action="store_true", help="time only this project's contenders")
    parser.add_argument("--peer_python", type=Path, default=ROOT / ".venv-peer" / "bin" / "python")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    parser.add_argument("--work_dir", type=Path, default=None, help="exports go here (default: a temporary folder)")
    parser.add_argument("--skip_quality", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)

    if not args.no_peer and not args.peer_python.is_file():
        print(
            f"bench_onnx: the peer environment is missing ({args.peer_python} does not exist).\n"
            "  Build it once with:  bash benchmarks/setup_peer_venv.sh\n"
            "  or point --peer_python at its interpreter, or pass --no_peer to time this project's contenders only.",
            file=sys.stderr,
        )
        return 2
    if not (args.data_dir / "stsb" / "test.jsonl").is_file() or not (args.data_dir / "sst2").is_dir():
        print(f"bench_onnx: no SST-2 / STS-B data under {args.data_dir} (use --data_dir)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from multitask_st import default_backbone

    command = "python benchmarks/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = describe_machine(threads)
    print(machine)
    print(command)
    corpus = load_corpus(args.data_dir)
    corpus = corpus[: args.num_sentences] if args.num_sentences else corpus
    latency_count = min(args.latency_sentences, len(corpus))
    rows = read_jsonl(args.data_dir / "stsb" / "test.jsonl")
    sts_texts = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
    gold = [row["score"] for row in rows]
    print(f"{len(corpus)} sentences; latency over {latency_count}; batch sizes {args.batch_sizes}")

    scratch = tempfile.TemporaryDirectory(prefix="bench_onnx-") if args.work_dir is None else None
    work_dir = Path(scratch.name) if scratch else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    process = None
    try:
        models, info = build_ours(args.ours, work_dir, threads)
        contenders = [our_contender(name, models[name], corpus) for name in args.ours]
        peer_names: list[str] = []
        peer_lines: list[str] = []
        if not args.no_peer:
            sentences_file = work_dir / "sentences.json"
            sentences_file.write_text(json.dumps(corpus), encoding="utf-8")
            print("starting the peer (first run: exports its ONNX / O3 / qint8 / OpenVINO graphs) ...", flush=True)
            process = PeerProcess(
                args.peer_python, args.peers, str(default_backbone()), work_dir, threads, sentences_file
            )
            peer_names = list(process.peers)
            peer_lines.append("peer: " + ", ".join(f"{k} {v}" for k, v in process.versions.items() if v))
            peer_lines.append(f"peer int8 configuration: {process.quantization}; files: {process.files}")
            for name, reason in process.skipped.items():
                peer_lines.append(f"peer {name} skipped: {reason}")
            contenders = [peer_contender(process, name, work_dir) for name in peer_names] + contenders
        for line in peer_lines:
            print(line)

        print("latency ...", flush=True)
        latency = measure_latency(contenders, latency_count, args.chunk, warmup=min(20, latency_count))
        throughput = {}
        for size in args.batch_sizes:
            print(f"throughput at batch size {size} ...", flush=True)
            throughput[size] = measure_throughput(contenders, size, args.repeats, len(corpus))
        quality: dict = {}
        if not args.skip_quality:
            print("quality ...", flush=True)
            reference = models["torch-fp32"] if "torch-fp32" in models else None
            if reference is None:
                from modeling_mtl import MultiTaskModel

                reference = MultiTaskModel.from_backbone(default_backbone()).eval()
            reference_vectors = reference.encode(sts_texts, batch_size=32, normalize=True).astype(np.float64)
            quality = measure_quality(contenders, reference_vectors, sts_texts, gold)
    finally:
        if process is not None:
            process.close()
        if scratch is not None:
            scratch.cleanup()

    names = [contender.name for contender in contenders]
    table, verdicts = report(names, peer_names, latency, throughput, quality, args.batch_sizes)
    export = info.get("description") or {}
    int8 = export.get("quantization") or {}
    lines = [
        f"> {machine}",
        ">",
        f"> `{command}`",
        "",
        *[f"- {line}" for line in peer_lines],
        f"- ours: graph fused {export.get('fused')}, int8 scheme {int8.get('scheme')}, "
        f"{len(int8.get('outlier_channels') or {})} matmuls with float32 outlier channels; "
        f"export took {info.get('export_seconds')} s",
        f"- {len(corpus)} sentences (SST-2 validation + STS-B test, shuffled, seed 0); latency over {latency_count} "
        f"single-sentence calls per contender; throughput: median of {args.repeats} passes; ratios: to the fastest "
        "peer of the column (> 1 = faster than every peer)",
        "",
        table,
        "",
        *[f"- {verdict}" for verdict in verdicts],
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
