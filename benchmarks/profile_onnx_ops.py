"""Where an exported graph spends its time: onnxruntime's per-operator kernel time, for the same file run with
onnxruntime's CPU fusions allowed to rebuild `SkipLayerNormalization` / `BiasGelu` and with them kept apart
(`multitask_st.onnx.CPU_DISABLED_FUSIONS`, what `OnnxMultiTaskModel` does), in one run (docs/ONNX.md).

    python benchmarks/profile_onnx_ops.py --export_dir /tmp/onnx_work/ours --data_dir ../shared/data \
        [--files model_int8.onnx model.onnx] [--batch_size 32] [--num_sentences 1024]

`--export_dir` is an `export_onnx` folder (e.g. the one `bench_onnx.py` writes under its `--work_dir`). For each
graph file and each session kind the script prints the sentences/s of a timed pass (median of `--repeats`, passes
interleaved), then the kernel time per operator type from onnxruntime's profiler over one more pass, and the ratio
of the two sessions' throughputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_encode import load_corpus  # noqa: E402


def session(path: Path, threads: int, keep_apart: bool, profile_dir: str | None = None):
    import onnxruntime

    from multitask_st.onnx import CPU_DISABLED_FUSIONS

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / path.stem)
    disabled = list(CPU_DISABLED_FUSIONS) if keep_apart else []
    return onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def kernel_times(path: Path, threads: int, keep_apart: bool, feeds: list[dict]) -> Counter:
    """Microseconds of kernel time per operator type over one pass, from onnxruntime's profiler."""
    with tempfile.TemporaryDirectory() as scratch:
        profiled = session(path, threads, keep_apart, scratch)
        for feed in feeds:
            profiled.run(["embeddings"], feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    times: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export_dir", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--files", nargs="+", default=["model_int8.onnx", "model.onnx"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_sentences", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=8, help="operator types listed per session")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from configuration_mtl import MultiTaskConfig
    from multitask_st.onnx import calibration_feeds

    threads = args.threads or torch.get_num_threads()
    config = MultiTaskConfig.from_pretrained(args.export_dir)  # as OnnxMultiTaskModel loads the folder
    tokenizer = AutoTokenizer.from_pretrained(args.export_dir, config=config.backbone_config)
    sentences = sorted(load_corpus(args.data_dir)[: args.num_sentences], key=len)  # length-sorted, as `encode` batches
    feeds = calibration_feeds(tokenizer, sentences, config.max_seq_length, args.batch_size)
    count = sum(len(feed["input_ids"]) for feed in feeds)
    print(f"{count} sentences, batch size {args.batch_size}, {threads} threads, export {args.export_dir}")

    for name in args.files:
        path = args.export_dir / name
        kinds = {"fusions allowed": False, "kept apart": True}
        sessions = {kind: session(path, threads, apart) for kind, apart in kinds.items()}
        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        for run in sessions.values():
            run.run(["embeddings"], feeds[0])  # warm-up
        for _ in range(args.repeats):
            for kind, run in sessions.items():
                started = time.perf_counter()
                for feed in feeds:
                    run.run(["embeddings"], feed)
                seconds[kind].append(time.perf_counter() - started)
        rate = {kind: count / statistics.median(values) for kind, values in seconds.items()}
        for kind, apart in kinds.items():
            times = kernel_times(path, threads, apart, feeds)
            total = sum(times.values())
            print(f"\n{name}, {kind}: {rate[kind]:.0f} sentences/s; kernel time {total / 1000:.1f} ms")
            for op, value in times.most_common(args.top):
                print(f"  {op:28s} {value / 1000:8.1f} ms  {100 * value / total:5.1f}%")
        print(f"\n{name}: kept apart / fusions allowed = {rate['kept apart'] / rate['fusions allowed']:.2f}x")


if __name__ == "__main__":
    main()
