"""The `mtl` console entry point, run as a real subprocess (and in-process for speed where the process start-up does
not matter)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_service import PAIR_TASKS, PAIRS, TEXT_TASKS, free_port, make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def mtl_command() -> list[str]:
    # The installed console script when present (what users run), else the module (same `main`).
    return [shutil.which("mtl")] if shutil.which("mtl") else [sys.executable, "-m", "multitask_st.cli"]


def mtl(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        mtl_command() + list(args), capture_output=True, text=True, timeout=120, cwd=cwd or ROOT, env=env
    )


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same `main` in-process (a subprocess pays for Python's start-up and importing torch on every call)."""
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


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Loading the model fails the test: whatever is checked must be checked before that long work starts."""
    from modeling_mtl import MultiTaskModel

    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the command line was checked")

    monkeypatch.setattr(MultiTaskModel, "from_pretrained", refuse)


# ---------------------------------------------------------------------------------------------------- good path


def test_help(capsys):
    result = mtl("--help")
    assert result.returncode == 0
    for command in ("encode", "predict", "similarity", "train", "push", "serve"):
        assert command in result.stdout
    encode_help = run_main(capsys, "encode", "--help")
    assert encode_help.returncode == 0 and "--output" in encode_help.stdout and ".npy" in encode_help.stdout
    serve_help = run_main(capsys, "serve", "--help")
    for option in ("--api-key", "--timeout-keep-alive", "--max-body-bytes", "--model-name", "--limit-concurrency"):
        assert option in serve_help.stdout


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
        str(tmp_path / "out" / "emb.jsonl"),
        "-q",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "emb.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == texts
    np.testing.assert_allclose([row["embedding"] for row in rows], vectors, atol=1e-5)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["emb.jsonl"]  # no temporary files left


def test_predict_json(model_dir, model, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("\ufeffI loved it!\n\nJohn Smith works for Acme.\n")  # a byte-order mark
    result = run_main(capsys, "predict", "--model", model_dir, "--file", str(tmp_path / "texts.txt"))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["text"] for row in rows] == ["I loved it!", "John Smith works for Acme."]
    assert set(rows[0]["predictions"]) == set(TEXT_TASKS)
    assert rows[0]["predictions"]["sentiment"]["label"] == model.predict("I loved it!")["sentiment"]["label"]
    subset = run_main(
        capsys, "predict", "--model", model_dir, "Hi", "--tasks", "sentiment,rating", "-o", str(tmp_path / "p.json")
    )
    assert subset.returncode == 0, subset.stderr
    assert set(json.loads((tmp_path / "p.json").read_text())[0]["predictions"]) == {"sentiment", "rating"}


TEXT_FILES = {
    # A JSON array was once embedded as one text, and a CSV's header line predicted as a text: each structured
    # format is read as what it is (docs/CLI.md, "Input").
    "in.json": lambda texts: json.dumps(texts, indent=1),
    "in.csv": lambda texts: "id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)),
    "in.tsv": lambda texts: "text\tid\n" + "".join(f"{t}\t{i}\n" for i, t in enumerate(texts)),
    "objects.json": lambda texts: json.dumps([{"text": t} for t in texts]),
}


@pytest.mark.parametrize("name", TEXT_FILES)
def test_structured_text_files_give_their_texts_and_nothing_else(model_dir, model, tmp_path, capsys, name):
    texts = ["A man plays guitar, loudly.", "A woman sings."]
    (tmp_path / name).write_text(TEXT_FILES[name](texts))
    result = run_main(capsys, "predict", "--model", model_dir, "--file", str(tmp_path / name), "--tasks", "sentiment")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["text"] for row in rows] == texts
    assert [row["predictions"]["sentiment"]["label"] for row in rows] == [
        p["sentiment"]["label"] for p in model.predict(texts, tasks=["sentiment"])
    ]


@pytest.mark.parametrize("source", ["tsv", "tsv-header", "jsonl", "json", "csv", "arguments"])
def test_predict_pairs(model_dir, model, tmp_path, capsys, source):
    if source.startswith("tsv"):
        header = "text\ttext_pair\n" if source == "tsv-header" else ""  # a header naming the fields is skipped
        (tmp_path / "pairs.tsv").write_text(header + "".join(f"{a}\t{b}\n" for a, b in PAIRS))
        inputs = ["--pairs", str(tmp_path / "pairs.tsv")]
    elif source == "json":
        (tmp_path / "pairs.json").write_text(json.dumps([list(pair) for pair in PAIRS]))
        inputs = ["--pairs", str(tmp_path / "pairs.json")]
    elif source == "csv":
        rows = "".join(f'"{a}","{b}"\n' for a, b in PAIRS)
        (tmp_path / "pairs.csv").write_text("text,text_pair\n" + rows)
        inputs = ["--pairs", str(tmp_path / "pairs.csv")]
    elif source == "jsonl":
        lines = [json.dumps({"text": a, "text_pair": b}) for a, b in PAIRS]
        (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n\n")
        inputs = ["--pairs", str(tmp_path / "pairs.jsonl")]
    else:
        inputs = [arg for pair in PAIRS for arg in ("--pair", *pair)]
    result = run_main(capsys, "predict", "--model", model_dir, *inputs, "-o", str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(row["text"], row["text_pair"]) for row in rows] == PAIRS
    for row, expected in zip(rows, model.predict(PAIRS)):
        assert set(row["predictions"]) == set(PAIR_TASKS)
        assert row["predictions"]["nli"]["label"] == expected["nli"]["label"]
        assert row["predictions"]["sts"]["cosine"] == pytest.approx(expected["sts"]["cosine"], abs=1e-5)


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


def test_similarity_pairs_pairwise_and_matrix(model_dir, model, tmp_path, capsys):
    a, b = [pair[0] for pair in PAIRS], [pair[1] for pair in PAIRS]
    pair_args = [arg for pair in PAIRS for arg in ("--pair", *pair)]
    result = run_main(
        capsys, "similarity", "--model", model_dir, *pair_args, "--pairwise", "--json", str(tmp_path / "s.json")
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["pairs"] == [list(pair) for pair in PAIRS]
    np.testing.assert_allclose(saved["scores"], model.similarity(a, b, pairwise=True), atol=1e-5)
    assert len(result.stdout.strip().splitlines()) == len(PAIRS)
    matrix = run_main(capsys, "similarity", "--model", model_dir, *pair_args, "--json", str(tmp_path / "m.json"), "-q")
    assert matrix.returncode == 0, matrix.stderr
    header, *lines = matrix.stdout.splitlines()
    ends = [found.end() for found in re.finditer(r"\d+", header)]
    for index, line in enumerate(lines):  # the row's index, then its cosines, each under its column's number
        assert line.split()[-len(b) - 1] == str(index), line
        assert [found.end() for found in re.finditer(r"-?\d\.\d{3}", line)] == ends, line
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["texts"] == a and saved["texts_b"] == b
    np.testing.assert_allclose(saved["scores"], model.similarity(a, b), atol=1e-5)


def test_a_heatmap_without_matplotlib_is_one_error_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch,
                                                                          no_model_loading):  # fmt: skip
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = run_main(capsys, "similarity", "--model", model_dir, "a", "b", "-o", str(tmp_path / "heat.png"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("needs matplotlib, which is not installed (pip install matplotlib, or the "
                                          "`serve` extra); --json saves the scores without it")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, model_dir):
    """Inputs and model folders that are wrong in one way each."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty_model").mkdir()
    (root / "garbage_model").mkdir()
    (root / "garbage_model" / "config.json").write_text("{not json")
    (root / "no_weights").mkdir()
    shutil.copy(Path(model_dir) / "config.json", root / "no_weights" / "config.json")
    (root / "a_file").write_text("not a folder")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (root / "nofield.jsonl").write_text('{"sentence": "ok"}\n')
    (root / "list.jsonl").write_text("[1, 2]\n")
    (root / "object.json").write_text('{"text": "ok"}')
    (root / "noheader.csv").write_text("a man,plays\n")
    (root / "ragged.csv").write_text("text\nok\n1,2\n")
    (root / "surrogate.jsonl").write_text('{"text": "ok \\ud800"}\n')
    (root / "three.tsv").write_text("a\tb\na\tb\tc\n")
    (root / "one.tsv").write_text("just one column\n")
    (root / "pairs.csv").write_text("a,b\n")
    (root / "nopair.jsonl").write_text('{"text": "a", "pair": "b"}\n')
    (root / "blank.tsv").write_text("a\tb\nthe fox\t\n")  # a trailing tab: the second text is missing
    (root / "upper.JSONL").write_text('{"text": "a", "text_pair": " "}\n')  # read as JSONL, whatever the case
    (root / "folder.npy").mkdir()
    (root / "empty.txt").write_text("\n\n")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "--model", "/nonexistent/model", "hi", "-o", "x.npy"], "--model /nonexistent/model: no such model"),
        (["encode", "--model", "{bad}/empty_model", "hi", "-o", "x.npy"], "empty_model holds no config.json"),
        (["encode", "--model", "{bad}/garbage_model", "hi", "-o", "x.npy"], "config.json is not valid JSON"),
        (["encode", "--model", "{bad}/no_weights", "hi", "-o", "x.npy"], "holds no model*.safetensors weights"),
        (["encode", "--model", "{bad}/a_file", "hi", "-o", "x.npy"], "a_file: not a folder"),
        (
            ["encode", "--model", "{backbone}", "hi", "-o", "x.npy"],
            "describes a 'bert' model, not a multi-task model",
        ),
        (["encode", "--model", "{model}", "--file", "/nonexistent/in.txt", "-o", "x.npy"], "cannot read --file"),
        (["encode", "--model", "{model}", "--file", "{bad}/latin1.txt", "-o", "x.npy"], "latin1.txt: not UTF-8 text"),
        (["encode", "--model", "{model}", "--file", "{bad}/bad.jsonl", "-o", "x.npy"], "bad.jsonl:2: not valid JSON"),
        (["encode", "--model", "{model}", "--file", "{bad}/nofield.jsonl", "-o", "x.npy"], "string field 'text'"),
        (
            ["encode", "--model", "{model}", "--file", "{bad}/list.jsonl", "-o", "x.npy"],
            "expected an object with ['text'] or a string, got [1, 2]",
        ),
        (["encode", "--model", "{model}", "--file", "{bad}/object.json", "-o", "x.npy"], "expected a JSON array"),
        (
            ["encode", "--model", "{model}", "--file", "{bad}/noheader.csv", "-o", "x.npy"],
            "noheader.csv: the header line names no 'text' column (it names ['a man', 'plays'])",
        ),
        (["encode", "--model", "{model}", "--file", "{bad}/ragged.csv", "-o", "x.npy"], "ragged.csv:3: expected 1"),
        (["encode", "--model", "{model}", "--file", "{bad}/surrogate.jsonl", "-o", "x.npy"], "lone surrogate"),
        (
            ["encode", "--model", "{model}", "caf\udce9", "-o", "x.npy"],
            "argument 1 holds a lone surrogate (U+DCE9, the byte 0xe9",
        ),
        (["encode", "--model", "{model}", "-o", "x.npy"], "no input texts"),
        (["encode", "--model", "{model}", "--file", "{bad}/empty.txt", "-o", "x.npy"], "no input texts"),
        (["encode", "--model", "{model}", "hi", "-o", "x.csv"], "--output x.csv: use a .npy or .jsonl file name"),
        (["encode", "--model", "{model}", "hi", "-o", "{bad}/a_file/x.npy"], "a_file is a file, not a folder"),
        (["encode", "--model", "{model}", "hi", "-o", "{bad}/folder.npy"], "folder.npy: is a folder"),
        (["encode", "--model", "{model}", "hi", "-o", "/proc/x.npy"], "cannot write in /proc"),
        (["predict", "--model", "{model}", "hi", "--tasks", "sentiment,nope"], "unknown task(s) ['nope']"),
        (["predict", "--model", "{model}", "hi", "--tasks", "nli"], "task(s) ['nli'] take text pairs"),
        (["predict", "--model", "{model}", "--pair", "a", "b", "--tasks", "sts,rating"], "['rating'] take single"),
        (["predict", "--model", "{model}", "--pairs", "{bad}/pairs.csv"], "names no 'text' or 'text_pair' column"),
        (["predict", "--model", "{model}", "--pairs", "{bad}/three.tsv"], "three.tsv:2: expected 2 tab-separated"),
        (["predict", "--model", "{model}", "--pairs", "{bad}/one.tsv"], "one.tsv:1: expected 2 tab-separated columns"),
        (["predict", "--model", "{model}", "--pairs", "{bad}/nopair.jsonl"], "fields 'text' and 'text_pair'"),
        (["predict", "--model", "{model}", "--pair", "a", "b\udcff"], "--pair 1 (second text) holds a lone surrogate"),
        (["predict", "--model", "{model}", "--pairs", "{bad}/blank.tsv"], "blank.tsv:2 (second text) is empty: both"),
        (["predict", "--model", "{model}", "--pairs", "{bad}/upper.JSONL"], "upper.JSONL:1 (second text) is empty"),
        (["similarity", "--model", "{model}", "--pair", "", "b"], "--pair 1 (first text) is empty: both texts"),
        (["predict", "--model", "{model}", "hi", "-o", "{bad}/a_file/p.json"], "is a file, not a folder"),
        (["similarity", "--model", "{model}", "only one"], "at least two texts"),
        (["similarity", "--model", "{model}", "a", "b", "-o", "heat.txt"], "use a .png, .svg or .pdf file name"),
        (["similarity", "--model", "{model}", "a", "b", "--json", "{bad}/a_file/s.json"], "is a file, not a folder"),
        # Never into a model's folder: an output there could replace one of its files.
        (["predict", "--model", "{model}", "hi", "-o", "{model}/config.json"], "holds a model; write outputs outside"),
        (["similarity", "--model", "{model}", "a", "b", "--json", "{model}/s.json"], "holds a model; write outputs"),
        (["encode", "--model", "{model}", "hi", "-o", "{model}/x.npy"], "holds a model; write outputs outside"),
        (["encode", "--model", "user/model", "--backend", "onnx", "hi", "-o", "x.npy"], "mtl export user/model -o DIR"),
        (["export", "user/model"], "user/model is not a local folder: give the export folder with -o"),
        (["serve", "--model", "/nonexistent/model", "--port", "{free}"], "no such model folder"),
        (["serve", "--model", "{model}", "--host", "10.255.255.1", "--port", "{free}"], "cannot listen there"),
        (["serve", "--model", "{model}", "--port", "{busy}"], "--port {busy}: address already in use"),
        (["serve", "--model", "{bad}/empty_model", "--port", "{busy}"], "--port {busy}: address already in use"),
    ],
)
def test_errors(model_dir, tiny_bert, bad_files, tmp_path, args, message, capsys, monkeypatch, no_model_loading):
    """Exit code 1, one line naming the problem, and all of it found before the model is loaded."""
    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {
            "{model}": model_dir,
            "{bad}": str(bad_files),
            "{backbone}": str(tiny_bert),
            "{busy}": str(busy.getsockname()[1]),
            "{free}": str(free_port()),
        }

        def fill(text: str) -> str:
            for key, value in values.items():
                text = text.replace(key, value)
            return text

        result = run_main(capsys, *map(fill, args))
    assert result.returncode == 1, result.stderr
    assert fill(message) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"mtl {args[0]}: error: ")
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "hi"], "the following arguments are required: --model, --output/-o"),
        (["encode", "--model", "{model}", "hi", "-o", "x.npy", "--batch-size", "0"], "'0' is not a positive integer"),
        (["encode", "--model", "{model}", "hi", "-o", "x.npy", "--device", "gpu9"], "'gpu9' is not a torch device"),
        (["encode", "--model", "{model}", "hi", "-o", "x.npy", "--normalize", "--no-normalize"], "not allowed with"),
        (["predict", "--model", "{model}", "hi", "--pair", "a", "b"], "give texts (arguments or --file) or pairs"),
        (["predict", "--model", "{model}", "hi", "--tasks", ","], "--tasks ',': name at least one task"),
        (["predict", "--model", "{model}", "--pair", "only-one"], "argument --pair: expected 2 arguments"),
        (["similarity", "--model", "{model}", "a", "b", "--pairwise"], "--pairwise needs pairs"),
        (["similarity", "--model", "{model}", "--pair", "a", "b", "--pairwise", "-o", "h.png"], "--pairwise gives one"),
        (["serve", "--model", "{model}", "--port", "70000"], "argument --port: '70000' is not a TCP port (1-65535)"),
        (["serve", "--model", "{model}", "--port", "0"], "'0' is not a TCP port"),
        (["serve", "--model", "{model}", "--port", "http"], "'http' is not a TCP port"),
        (["serve", "--model", "{model}", "--max-batch-size", "0"], "argument --max-batch-size: '0' is not a positive"),
        (["serve", "--model", "{model}", "--max-text-length", "-5"], "'-5' is not a positive integer"),
        (["serve", "--model", "{model}", "--batch-wait-ms", "-1"], "'-1' is not a number >= 0"),
        (["serve", "--model", "{model}", "--batch-wait-ms", "nan"], "'nan' is not a number >= 0"),
        (["serve", "--model", "{model}", "--timeout-keep-alive", "0"], "argument --timeout-keep-alive"),
        (["serve", "--model", "{model}", "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["serve", "--model", "{model}", "--api-key", " "], "--api-key is empty"),
        (["serve", "--model", "{model}", "--host", "0.0.0.0", "--port", "8765"], "0.0.0.0 without an API key serves"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_command_line(model_dir, tmp_path, args, message, capsys, monkeypatch, no_model_loading):
    """Exit code 2 and one line (argparse's usage block is not repeated)."""
    monkeypatch.chdir(tmp_path)
    result = run_main(capsys, *[arg.replace("{model}", model_dir) for arg in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_device_without_gpu(model_dir, tmp_path, capsys, no_model_loading):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    for device in ("cuda", "cuda:1"):
        result = run_main(
            capsys, "encode", "--model", model_dir, "hi", "-o", str(tmp_path / "x.npy"), "--device", device
        )
        assert result.returncode == 1
        assert f"--device {device}: no CUDA GPU is available here" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_failure_during_the_work_leaves_no_partial_output(model_dir, tmp_path, capsys, monkeypatch):
    from modeling_mtl import MultiTaskModel
    from multitask_st.cli import main
    from validation_mtl import InputError

    def refuse(*args, **kwargs):  # an input the model refuses: one line, no traceback
        raise InputError("texts[0] is not something this model reads\nsecond line")

    def fail(*args, **kwargs):  # anything else (a bug, a device): the traceback is kept
        raise RuntimeError("device lost")

    output = ["-q", "-o", str(tmp_path / "out" / "p.json")]
    monkeypatch.setattr(MultiTaskModel, "predict", refuse)
    result = run_main(capsys, "predict", "--model", model_dir, "hi", *output)
    assert result.returncode == 1
    assert result.stderr.strip() == "mtl predict: error: texts[0] is not something this model reads\nsecond line"
    monkeypatch.setenv("MTL_DEBUG", "1")  # the one-line error with its traceback
    with pytest.raises(InputError, match="not something this model reads"):
        main(["predict", "--model", model_dir, "hi", *output])
    monkeypatch.delenv("MTL_DEBUG")
    monkeypatch.setattr(MultiTaskModel, "predict", fail)
    with pytest.raises(RuntimeError, match="device lost"):
        main(["predict", "--model", model_dir, "hi", *output])
    assert list((tmp_path / "out").iterdir()) == []  # no output and no temporary file

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MultiTaskModel, "predict", interrupt)
    result = run_main(capsys, "predict", "--model", model_dir, "hi", "-q")
    assert result.returncode == 130 and result.stderr.strip() == "mtl predict: interrupted"


def test_error_exit_code_from_console_script(tmp_path):
    result = mtl("encode", "--model", str(tmp_path / "missing"), "hi", "-o", str(tmp_path / "x.npy"))
    assert result.returncode == 1
    assert "mtl encode: error: --model" in result.stderr and "Traceback" not in result.stderr


def test_train_exits_as_the_script_does(tmp_path):
    """`mtl train` is `python train.py`: a refused option is one error line and exit code 2 from both."""
    flags = ["--output_dir", str(tmp_path / "out"), "--drift_sample_size", "-1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    script = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], capture_output=True, text=True, env=env)
    command = mtl("train", *flags)
    assert script.returncode == command.returncode == 2, (script.stderr, command.stderr)
    for result in (script, command):
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "drift_sample_size" in last and "Traceback" not in result.stderr


@pytest.mark.parametrize("command, option", [("train", "--embedding_protection"), ("push", "--repo_id")])
def test_train_and_push_delegate_help(command, option):
    result = mtl(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: mtl {command} " in result.stdout and option in result.stdout  # the script's own options


def test_serve_starts_the_service(model_dir, tmp_path):
    """`mtl serve` is the one documented start command: run it and talk to it over HTTP (API key from the
    environment, the model's local path kept private)."""
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "MTL_API_KEY": "from-env"}
    args = ["serve", "--model", model_dir, "--port", str(port), "--max-batch-size", "4", "--log-level", "warning"]
    process = subprocess.Popen(
        mtl_command() + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "mtl serve did not answer /health within 60 s"
            time.sleep(0.2)
        assert httpx.get(f"{url}/info").status_code == 401
        key = {"Authorization": "Bearer from-env"}
        info = httpx.get(f"{url}/info", headers=key).json()
        assert info["max_batch_size"] == 4 and len(info["tasks"]) == 6 and info["api_key_required"] is True
        assert info["model"] == Path(model_dir).name and model_dir not in httpx.get(f"{url}/openapi.json").text
        assert httpx.post(f"{url}/embed", json={"texts": ["a"] * 5}, headers=key).status_code == 413
        assert httpx.post(f"{url}/predict", json={"pairs": [["a", "b"]]}, headers=key).status_code == 200
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
