"""The `mtl` console entry point, run as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_service import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def mtl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # The installed console script when present (what users run), else the module (same `main`).
    command = [shutil.which("mtl")] if shutil.which("mtl") else [sys.executable, "-m", "multitask_st.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=120, cwd=cwd or ROOT, env=env)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same `main` in-process (the subprocess start-up, mostly importing torch, costs ~6 s per call)."""
    from multitask_st.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory):
    return str(make_tiny_model(tiny_bert, tmp_path_factory.mktemp("cli_model")))


@pytest.fixture(scope="module")
def model(model_dir):
    from modeling_mtl import MultiTaskModel

    return MultiTaskModel.from_pretrained(model_dir).eval()


def test_help(capsys):
    result = mtl("--help")
    assert result.returncode == 0
    for command in ("encode", "predict", "similarity", "train", "push", "serve"):
        assert command in result.stdout
    encode_help = run_main(capsys, "encode", "--help")
    assert encode_help.returncode == 0 and "--output" in encode_help.stdout and ".npy" in encode_help.stdout


def test_encode_npy_and_jsonl(model_dir, model, tmp_path, capsys):
    texts = ["A man plays guitar.", "A woman sings."]
    result = mtl("encode", "--model", model_dir, *texts, "--output", str(tmp_path / "emb.npy"))
    assert result.returncode == 0, result.stderr
    vectors = np.load(tmp_path / "emb.npy")
    assert vectors.shape == (2, model.config.embedding_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, model.encode(texts), atol=1e-5)

    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"sentence": t}) for t in texts) + "\n")
    result = run_main(
        capsys,
        "encode",
        "--model",
        model_dir,
        "--file",
        str(tmp_path / "in.jsonl"),
        "--text-field",
        "sentence",
        "-o",
        str(tmp_path / "emb.jsonl"),
        "-q",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "emb.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == texts
    np.testing.assert_allclose([row["embedding"] for row in rows], vectors, atol=1e-5)


def test_predict_json(model_dir, model, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("I loved it!\n\nJohn Smith works for Acme.\n")
    result = run_main(capsys, "predict", "--model", model_dir, "--file", str(tmp_path / "texts.txt"))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["text"] for row in rows] == ["I loved it!", "John Smith works for Acme."]
    assert set(rows[0]["predictions"]) == {"sentiment", "topics", "ner", "similarity"}
    assert rows[0]["predictions"]["sentiment"]["label"] == model.predict("I loved it!")["sentiment"]["label"]
    subset = run_main(
        capsys, "predict", "--model", model_dir, "Hi", "--tasks", "sentiment,similarity", "-o", str(tmp_path / "p.json")
    )
    assert subset.returncode == 0, subset.stderr
    assert set(json.loads((tmp_path / "p.json").read_text())[0]["predictions"]) == {"sentiment", "similarity"}


def test_similarity_prints_and_saves_heatmap(model_dir, model, tmp_path):
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell sharply today."]
    result = mtl(
        "similarity",
        "--model",
        model_dir,
        *texts,
        "-o",
        str(tmp_path / "heat.png"),
        "--json",
        str(tmp_path / "sim.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "A cat sits on the mat." in result.stdout
    png = (tmp_path / "heat.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    vectors = model.encode(texts, normalize=True)
    np.testing.assert_allclose(
        json.loads((tmp_path / "sim.json").read_text())["scores"], vectors @ vectors.T, atol=1e-5
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "--model", "/nonexistent/model", "hi", "-o", "x.npy"], "no such model folder"),
        (["encode", "--model", "{model}", "--file", "/nonexistent/in.txt", "-o", "x.npy"], "cannot read --file"),
        (["encode", "--model", "{model}", "-o", "x.npy"], "no input texts"),
        (["encode", "--model", "{model}", "hi", "-o", "x.csv"], "use a .npy or .jsonl"),
        (["predict", "--model", "{model}", "hi", "--tasks", "sentiment,nope"], "unknown task(s) ['nope']"),
        (["similarity", "--model", "{model}", "only one"], "at least two texts"),
    ],
)
def test_errors(model_dir, tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_main(capsys, *[arg.replace("{model}", model_dir) for arg in args])
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_error_exit_code_from_console_script(tmp_path):
    result = mtl("encode", "--model", str(tmp_path / "missing"), "hi", "-o", str(tmp_path / "x.npy"))
    assert result.returncode == 1
    assert "mtl encode: error: --model" in result.stderr and "Traceback" not in result.stderr


def test_bad_command_line(capsys):
    result = run_main(capsys, "encode", "hi")  # --model and --output missing
    assert result.returncode == 2 and "--model" in result.stderr


@pytest.mark.parametrize("command, module", [("train", "train"), ("push", "push_to_hub")])
def test_train_and_push_delegate_help(command, module):
    if not (ROOT / f"{module}.py").is_file():
        pytest.skip(f"{module}.py not written yet")
    result = mtl(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower()


def test_serve_starts_the_service(model_dir, tmp_path):
    """`mtl serve` is the one documented start command: run it and talk to it over HTTP."""
    import httpx
    from test_service import free_port

    port = free_port()
    command = [shutil.which("mtl")] if shutil.which("mtl") else [sys.executable, "-m", "multitask_st.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = ["serve", "--model", model_dir, "--port", str(port), "--max-batch-size", "4", "--log-level", "warning"]
    process = subprocess.Popen(command + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "mtl serve did not answer /health within 60 s"
            time.sleep(0.2)
        info = httpx.get(f"http://127.0.0.1:{port}/info").json()
        assert info["max_batch_size"] == 4 and len(info["tasks"]) == 4
        assert httpx.post(f"http://127.0.0.1:{port}/embed", json={"texts": ["a"] * 5}).status_code == 413
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_training_curves_plot(tmp_path):
    from multitask_st.plots import training_curves

    history = [{"step": s, "loss": 1 / s, "loss_a": 1 / s, "loss_b": 2 / s} for s in (10, 20, 30)]
    history.append({"step": 30, "eval_loss": 0.2, "eval_a_accuracy": 0.8, "eval_combined_score": 0.8})
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    path = training_curves(tmp_path, tmp_path / "curve.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="empty log_history"):
        training_curves({"log_history": []}, tmp_path / "empty.png")
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        training_curves(tmp_path / "missing", tmp_path / "none.png")
