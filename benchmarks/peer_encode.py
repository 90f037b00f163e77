"""Helper of `bench_onnx.py`, run inside `.venv-peer` (built by `setup_peer_venv.sh`): sentence-transformers'
backends behind a JSON-lines protocol on stdin/stdout, so that the benchmark can interleave them with this
project's contenders pass by pass. Standalone: it imports nothing of this project (whose transformers 5 the
peer's optimum-onnx cannot use).

Requests (one JSON object per line on stdin; one JSON reply per line on stdout, `{"error": ...}` on failure):
    {"op": "setup", "model_dir": D, "work_dir": W, "peers": [...], "threads": N, "sentences": PATH}
        copies the sentence-transformers folder D to W once, exports what each peer needs there (ONNX, O3, qint8,
        OpenVINO; reused by later runs), loads the peers; replies with the peers loaded and why others were not.
    {"op": "latency", "peer": P, "start": i, "stop": j}: `encode([s])` for each sentence i..j-1; seconds per call.
    {"op": "pass", "peer": P, "batch_size": B, "limit": n}: `encode(sentences[:n], batch_size=B)`; seconds.
    {"op": "embed", "peer": P, "texts": PATH, "out": PATH, "batch_size": B}: embeddings of a JSON list of texts
        written to an .npy file.
    {"op": "quit"}
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

PEERS = ("st-torch", "st-onnx", "st-onnx-O3", "st-onnx-qint8", "st-openvino")


def quantization_config_name() -> str:
    """The optimum dynamic-quantisation configuration for this CPU: avx512_vnni, avx512 or avx2."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = []
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def onnx_kwargs(file_name: str, threads: int) -> dict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # as many as the project's contenders use
    return {"file_name": file_name, "provider": "CPUExecutionProvider", "session_options": options}


def load_peers(model_dir: Path, work_dir: Path, wanted: list[str], threads: int) -> tuple[dict, dict, dict]:
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        export_dynamic_quantized_onnx_model,
        export_optimized_onnx_model,
    )

    torch.set_num_threads(threads)
    folder = work_dir / "peer-model"
    if not (folder / "modules.json").is_file():
        shutil.copytree(model_dir, folder, dirs_exist_ok=True)
    peers, skipped, files = {}, {}, {}

    def onnx_model(file_name: str):
        return SentenceTransformer(
            str(folder), device="cpu", backend="onnx", model_kwargs=onnx_kwargs(file_name, threads)
        )

    for name in wanted:
        try:
            if name == "st-torch":
                peers[name] = SentenceTransformer(str(folder), device="cpu")
                continue
            if name == "st-openvino":
                if not (folder / "openvino" / "openvino_model.xml").is_file():
                    SentenceTransformer(str(folder), device="cpu", backend="openvino").save_pretrained(str(folder))
                peers[name] = SentenceTransformer(
                    str(folder),
                    device="cpu",
                    backend="openvino",
                    model_kwargs={"file_name": "openvino/openvino_model.xml"},
                )
                files[name] = "openvino/openvino_model.xml"
                continue
            if not (folder / "onnx" / "model.onnx").is_file():  # sentence-transformers exports with optimum
                SentenceTransformer(str(folder), device="cpu", backend="onnx").save_pretrained(str(folder))
            if name == "st-onnx":
                file_name = "onnx/model.onnx"
            elif name == "st-onnx-O3":
                file_name = "onnx/model_O3.onnx"
                if not (folder / file_name).is_file():
                    export_optimized_onnx_model(onnx_model("onnx/model.onnx"), "O3", str(folder))
            elif name == "st-onnx-qint8":
                config = quantization_config_name()
                file_name = f"onnx/model_qint8_{config}.onnx"
                if not (folder / file_name).is_file():
                    export_dynamic_quantized_onnx_model(onnx_model("onnx/model.onnx"), config, str(folder))
            else:
                skipped[name] = f"unknown peer (known: {', '.join(PEERS)})"
                continue
            peers[name] = onnx_model(file_name)
            files[name] = file_name
        except Exception as error:  # a backend that is not installed or cannot export: reported, not fatal
            skipped[name] = (
                f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            )
            traceback.print_exc(file=sys.stderr)
    return peers, skipped, files


def versions() -> dict:
    import sentence_transformers
    import torch
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence-transformers": sentence_transformers.__version__,
    }
    for module in ("onnxruntime", "optimum", "openvino"):
        try:
            imported = __import__(module)
            found[module] = getattr(imported, "__version__", None) or _distribution_version(module)
        except ImportError:
            pass
    return found


def _distribution_version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (module, f"{module}-onnx", f"{module}-intel"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def main() -> int:
    protocol = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the replies
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    peers: dict = {}
    sentences: list[str] = []
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "quit":
                protocol.write(json.dumps({"ok": True}) + "\n")
                protocol.flush()
                return 0
            if op == "setup":
                sentences = json.loads(Path(request["sentences"]).read_text(encoding="utf-8"))
                peers, skipped, files = load_peers(
                    Path(request["model_dir"]),
                    Path(request["work_dir"]),
                    list(request["peers"]),
                    int(request["threads"]),
                )
                reply = {"peers": list(peers), "skipped": skipped, "files": files, "versions": versions()}
                reply["quantization"] = quantization_config_name()
            elif op == "latency":
                model = peers[request["peer"]]
                seconds = []
                for sentence in sentences[request["start"] : request["stop"]]:
                    start = time.perf_counter()
                    model.encode([sentence], show_progress_bar=False)
                    seconds.append(time.perf_counter() - start)
                reply = {"seconds": seconds}
            elif op == "pass":
                model = peers[request["peer"]]
                texts = sentences[: request.get("limit") or len(sentences)]
                start = time.perf_counter()
                model.encode(texts, batch_size=int(request["batch_size"]), show_progress_bar=False)
                reply = {"seconds": time.perf_counter() - start}
            elif op == "embed":
                import numpy as np

                texts = json.loads(Path(request["texts"]).read_text(encoding="utf-8"))
                vectors = peers[request["peer"]].encode(
                    texts, batch_size=int(request.get("batch_size", 32)), show_progress_bar=False, convert_to_numpy=True
                )
                np.save(request["out"], np.asarray(vectors, dtype=np.float32))
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            reply = {"error": f"{type(error).__name__}: {error}"}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
