"""Throughput and latency of the HTTP service under concurrent clients (real uvicorn server, real HTTP).

Usage:
    python benchmarks/bench_service.py [--model DIR] [--clients 1 8 32] [--requests 25] [--texts-per-request 1]
        [--batch-wait-ms 2] [--backends torch onnx onnx-int8] [--compare-no-batching]

Every response is checked against the serving backend's own `encode` of the same texts (atol 1e-5; cosine > 0.995
for int8, whose embeddings depend slightly on the batch a request is merged into); the script fails if any is wrong
or missing. Backends: `torch` (the `MultiTaskModel`), `onnx` / `onnx-int8` (the exported
graph through onnxruntime, `OnnxMultiTaskModel`: what `mtl serve --backend onnx` runs). Prints one JSON line per
run and a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(model, clients: int, requests: int, per_request: int, batch_wait_ms: float, max_texts: int | None) -> dict:
    import uvicorn

    from multitask_st.service import create_app

    app = create_app(model, max_batch_size=max(64, per_request), batch_wait_ms=batch_wait_ms)
    if max_texts is not None:
        app.state.batcher.max_texts = max_texts
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    words = ["music", "weather", "football", "cooking", "films", "markets", "travel", "science"]
    texts = [f"A short sentence about {words[i % 8]} number {i}, with a few more words." for i in range(512)]
    expected = dict(zip(texts, model.encode(texts)))
    if getattr(model, "int8", False):
        # Dynamic int8 scales activations per batch, so a text's embedding depends slightly on the requests it was
        # merged with (docs/ONNX.md): checked by cosine to its own encode instead of elementwise.
        def same(got: np.ndarray, want: np.ndarray) -> bool:
            return float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.995
    else:

        def same(got: np.ndarray, want: np.ndarray) -> bool:
            return np.allclose(got, want, atol=1e-5)

    latencies: list[float] = []
    errors: list[str] = []
    url = f"http://127.0.0.1:{port}"

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            http.get("/health")
            for i in range(requests):
                start_at = (index * requests + i) * per_request % len(texts)
                chunk = (texts + texts)[start_at : start_at + per_request]
                start = time.perf_counter()
                response = http.post("/embed", json={"texts": chunk})
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}")
                    continue
                got = np.array(response.json()["embeddings"])
                if got.shape[0] != len(chunk) or not all(same(g, expected[t]) for g, t in zip(got, chunk)):
                    errors.append("wrong embedding")

    calls0, reqs0 = app.state.batcher.model_calls, app.state.batcher.requests
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=10)
    total = clients * requests
    if errors or len(latencies) != total:
        raise SystemExit(f"{len(errors)} bad responses ({errors[:3]}), {len(latencies)}/{total} answered")
    lat = np.array(latencies) * 1000
    calls = app.state.batcher.model_calls - calls0
    return {
        "clients": clients,
        "requests": total,
        "texts_per_request": per_request,
        "batching": "off" if max_texts == 1 else f"on (wait {batch_wait_ms} ms)",
        "requests_per_s": round(total / elapsed, 1),
        "texts_per_s": round(total * per_request / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "model_calls": calls,
        "mean_requests_per_call": round((app.state.batcher.requests - reqs0) / calls, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="saved model folder (default: all-MiniLM-L6-v2 with a demo head)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8])
    parser.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--compare-no-batching", action="store_true", help="also run with one request per call")
    args = parser.parse_args(argv)

    import torch

    from modeling_mtl import MultiTaskModel
    from multitask_st import default_backbone

    if args.model:
        model = MultiTaskModel.from_pretrained(args.model).eval()
    else:
        model = MultiTaskModel.from_backbone(
            default_backbone(),
            tasks=[{"name": "sentiment", "type": "classification", "labels": ["negative", "positive"]}],
        ).eval()
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    backends = {"torch": model}
    if {"onnx", "onnx-int8"} & set(args.backends):
        import tempfile

        from multitask_st.onnx import OnnxMultiTaskModel, export_onnx

        folder = export_onnx(
            model, Path(tempfile.mkdtemp(prefix="bench_service_onnx_")), int8="onnx-int8" in args.backends
        )
        for name in ("onnx", "onnx-int8"):
            if name in args.backends:
                backends[name] = OnnxMultiTaskModel.from_pretrained(folder, int8=name == "onnx-int8")
    settings = [None, 1] if args.compare_no_batching else [None]
    rows = []
    for clients in args.clients:
        for name in args.backends:
            for max_texts in settings:
                result = run(
                    backends[name], clients, args.requests, args.texts_per_request, args.batch_wait_ms, max_texts
                )
                result["backend"] = name
                print(json.dumps(result), flush=True)
                rows.append(result)
    print("\n| backend | clients | batching | requests/s | p50 ms | p99 ms | requests per model call |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['clients']} | {row['batching']} | {row['requests_per_s']} | {row['p50_ms']} | "
            f"{row['p99_ms']} | {row['mean_requests_per_call']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
