"""multitask_st.onnx: the exported graph and the onnxruntime backend against PyTorch (tiny random models and the
real all-MiniLM-L6-v2 on real sentences), the export folder, export on first use, int8 quality, and the
`mtl export` functions. No timings."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from modeling_mtl import MultiTaskModel  # noqa: E402
from multitask_st.onnx import (  # noqa: E402
    INT8_FILE,
    MODEL_FILE,
    ONNX_CONFIG_NAME,
    PAIR_HEADS_FILE,
    QUANTIZATION,
    OnnxMultiTaskModel,
    export_onnx,
)
from multitask_st.onnx.cli import SCHEMES, add_export_arguments, run_export  # noqa: E402
from validation_mtl import FileError  # noqa: E402

TASKS = [
    {"name": "sentiment", "labels": ["negative", "positive"], "head": {"type": "mlp", "hidden_size": 16}},
    {"name": "tags", "type": "multi_label_classification", "labels": ["a", "b", "c"]},
    {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]},
    {"name": "score", "type": "regression", "labels": ["x", "y"]},
    {"name": "nli", "type": "pair_classification", "labels": ["e", "n", "c"], "pair_features": ["u", "|u-v|", "u*v"]},
    {"name": "sts", "type": "similarity"},
]
TEXTS = [
    "John Smith works for Acme Corporation in New York.",
    "I loved this movie!",
    "",
    "What is the capital city of France?",
    "x " * 300,  # truncated at max_seq_length
    "Maria visited the Louvre museum in Paris last summer.",
]
WORDS = [["John", "Smith", "lives", "in", "Paris"], ["Hello"], ["Maria", "", "visited", "Berlin", "."]]
PAIRS = [("A cat sits on the mat.", "A kitten rests on a rug."), ("Who wrote it?", "?"), ("same", "same")]


def sharpen_heads(model: MultiTaskModel, factor: float = 20.0) -> MultiTaskModel:
    """Scale every head's output layer so that random heads decide by clear margins: label equality between two
    backends then tests the computation, not which side of a near-tie 1e-7 of rounding falls on."""
    with torch.no_grad():
        for head in model.heads.values():
            head.out_proj.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tiny(tiny_bert, tmp_path_factory):
    """A tiny random model with every task type, a projection and normalisation, exported once (fp32 + int8)."""
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS, projection_dim=24, normalize=True).eval()
    sharpen_heads(model)
    folder = export_onnx(model, tmp_path_factory.mktemp("tiny") / "export", int8=True)
    return model, OnnxMultiTaskModel.from_pretrained(folder), folder


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def assert_same_predictions(expected: dict, got: dict, tolerance: float = 1e-4) -> None:
    """Same labels, tags and entity spans; scores and values within `tolerance`."""
    assert expected.keys() == got.keys()
    for name, want in expected.items():
        have = got[name]
        if "label" in want:  # classification, pair classification
            assert have["label"] == want["label"], name
            assert max_diff(list(have["scores"].values()), list(want["scores"].values())) < tolerance
        elif "labels" in want:  # multi-label
            assert have["labels"] == want["labels"], name
            assert max_diff(list(have["scores"].values()), list(want["scores"].values())) < tolerance
        elif "words" in want:  # token classification
            strip = [{key: word[key] for key in ("word", "start", "end", "tag")} for word in want["words"]]
            assert [{key: word[key] for key in ("word", "start", "end", "tag")} for word in have["words"]] == strip
            spans = [(e["entity"], e["text"], e["start"], e["end"]) for e in want["entities"]]
            assert [(e["entity"], e["text"], e["start"], e["end"]) for e in have["entities"]] == spans
            scores = [(w["score"], v["score"]) for w, v in zip(want["words"], have["words"]) if w["score"] is not None]
            assert all(abs(a - b) < tolerance for a, b in scores)
        elif "cosine" in want:
            assert abs(have["cosine"] - want["cosine"]) < tolerance
        else:  # regression
            assert max_diff(list(have["values"].values()), list(want["values"].values())) < tolerance


# ---------------------------------------------------------------------------------------------- the graph


def test_export_folder_holds_one_graph_with_every_single_text_head(tiny):
    model, _, folder = tiny
    description = json.loads((folder / ONNX_CONFIG_NAME).read_text())
    assert description["files"] == {"fp32": MODEL_FILE, "int8": INT8_FILE, "pair_heads": PAIR_HEADS_FILE}
    assert description["outputs"] == [
        "features",
        "embeddings",
        *(f"logits.{n}" for n in ("sentiment", "tags", "ner", "score")),
    ]
    assert description["tasks"]["nli"] == "logits.nli" and "sts" not in description["tasks"]
    assert max(description["parity"]["max_abs_diff"].values()) < 1e-4
    graph = onnx.load(str(folder / MODEL_FILE)).graph
    ops = [node.op_type for node in graph.node]
    assert description["fused"] and ops.count("Attention") == model.config.backbone_config.num_hidden_layers
    # The two fusions with slow CPU kernels are undone: plain layer norms and GELUs, whose bias adds read a matmul.
    assert "SkipLayerNormalization" not in ops and "BiasGelu" not in ops
    assert ops.count("LayerNormalization") == 2 * model.config.backbone_config.num_hidden_layers
    assert ops.count("Gelu") >= model.config.backbone_config.num_hidden_layers  # + the MLP head's own
    for graph_input in graph.input:  # batch and sequence axes are symbolic
        assert [dim.dim_param for dim in graph_input.type.tensor_type.shape.dim] == ["batch", "sequence"]
    for name in ("config.json", "tokenizer.json"):
        assert (folder / name).is_file()


@pytest.mark.parametrize("shape", [(1, 2), (3, 11), (5, 40)])
def test_graph_has_dynamic_axes_and_matches_forward(tiny, shape):
    """The raw graph, fed directly (not through `encode`), at shapes unlike the traced one, padded rows included."""
    model, onnx_model, _ = tiny
    generator = torch.Generator().manual_seed(shape[1])
    ids = torch.randint(5, model.config.backbone_config.vocab_size, shape, generator=generator)
    mask = torch.ones(shape, dtype=torch.int64)
    mask[0, max(1, shape[1] // 2) :] = 0  # a right-padded first row
    outputs = dict(
        zip(
            [output.name for output in onnx_model.session.get_outputs()],
            onnx_model.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}),
        )
    )
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
        features = model.pool(model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert max_diff(outputs["features"], features) < 1e-4
    assert max_diff(outputs["embeddings"], expected.embeddings) < 1e-4
    for name in ("sentiment", "tags", "score"):
        assert max_diff(outputs[f"logits.{name}"], expected.logits[name]) < 1e-4
    real = mask.bool().numpy()
    assert max_diff(outputs["logits.ner"][real], expected.logits["ner"].numpy()[real]) < 1e-4


# ---------------------------------------------------------------------------------------------- the runtime API


@pytest.mark.parametrize("normalize", [None, False])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_encode_matches_pytorch(tiny, normalize, batch_size):
    model, onnx_model, _ = tiny
    expected = model.encode(TEXTS, batch_size=batch_size, normalize=normalize)
    got = onnx_model.encode(TEXTS, batch_size=batch_size, normalize=normalize)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert max_diff(got, expected) < 1e-4
    tensor = onnx_model.encode(TEXTS, batch_size=batch_size, normalize=normalize, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and max_diff(tensor, got) < 1e-6


def test_single_text_fast_path_matches_the_batched_path(tiny):
    model, onnx_model, _ = tiny
    single = onnx_model.encode(TEXTS[0])
    assert single.shape == (model.config.embedding_dim,)
    assert max_diff(single, model.encode(TEXTS[0])) < 1e-4
    one_by_one = np.stack([onnx_model.encode([text])[0] for text in TEXTS])
    assert max_diff(one_by_one, onnx_model.encode(TEXTS, batch_size=64)) < 1e-5
    assert np.allclose(np.linalg.norm(one_by_one, axis=1), 1.0, atol=1e-5)  # config.normalize
    assert onnx_model.encode([]).shape == (0, model.config.embedding_dim)


def test_predict_matches_pytorch_on_texts_word_lists_and_pairs(tiny):
    model, onnx_model, _ = tiny
    for inputs in (TEXTS, WORDS, PAIRS):
        expected = model.predict(inputs, batch_size=2)
        got = onnx_model.predict(inputs, batch_size=2)
        assert len(got) == len(expected)
        for want, have in zip(expected, got):
            assert_same_predictions(want, have)
    assert_same_predictions(model.predict(TEXTS[0], tasks=["ner"]), onnx_model.predict(TEXTS[0], tasks=["ner"]))


def test_long_texts_are_tagged_whole_in_the_same_windows_as_pytorch(tiny):
    # The runtime shares the mixin's windowing: a text of several windows gets every word tagged, as in PyTorch.
    model, onnx_model, _ = tiny
    words = "John Smith visited the Louvre museum in Paris with Maria last summer".split() * 40
    text = " ".join(words)
    assert len(model.tokenizer(text)["input_ids"]) > 3 * model.config.max_seq_length
    expected = model.predict(text)
    got = onnx_model.predict(text)
    assert [w["word"] for w in got["ner"]["words"]] == words and all(w["tag"] for w in got["ner"]["words"])
    assert_same_predictions(expected, got)


def test_similarity_matches_pytorch(tiny):
    model, onnx_model, _ = tiny
    a, b = TEXTS[:3], TEXTS[3:]
    assert max_diff(onnx_model.similarity(a, b), model.similarity(a, b)) < 1e-4
    assert max_diff(onnx_model.similarity(a, b, pairwise=True), model.similarity(a, b, pairwise=True)) < 1e-4


def test_int8_graph_is_quantized_and_close(tiny):
    model, onnx_model, folder = tiny
    int8 = OnnxMultiTaskModel.from_pretrained(folder, int8=True)
    ops = {node.op_type for node in onnx.load(str(folder / INT8_FILE)).graph.node}
    assert {"DynamicQuantizeLinear", "QAttention"} <= ops
    description = json.loads((folder / ONNX_CONFIG_NAME).read_text())["quantization"]
    assert description["scheme"] == "outlier-split" and description["quantized_nodes"] > 0
    embeddings = int8.encode(TEXTS)
    cosines = (embeddings * onnx_model.encode(TEXTS)).sum(1)
    assert np.isfinite(embeddings).all() and cosines.min() > 0.95
    predictions = int8.predict(PAIRS)
    assert {result["nli"]["label"] for result in predictions} <= {"e", "n", "c"}


def test_cpu_sessions_keep_the_slow_fusions_apart(tiny, tmp_path):
    import onnxruntime

    from multitask_st.onnx import CPU_DISABLED_FUSIONS, disabled_fusions

    cpu, both = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert disabled_fusions(cpu, both) == list(CPU_DISABLED_FUSIONS)
    assert disabled_fusions([("CPUExecutionProvider", {})], both) == list(CPU_DISABLED_FUSIONS)
    assert disabled_fusions(both, both) == []  # an accelerator keeps onnxruntime's fused kernels
    assert disabled_fusions(both, cpu) == list(CPU_DISABLED_FUSIONS)  # ... unless it falls back to CPU

    def optimized_ops(disabled: list[str]) -> set[str]:
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        options.log_severity_level = 3
        onnxruntime.InferenceSession(str(tiny[2] / MODEL_FILE), options, providers=cpu, disabled_optimizers=disabled)
        return {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}

    assert "SkipLayerNormalization" in optimized_ops([])  # onnxruntime's default fuses them back at load time
    assert "SkipLayerNormalization" not in optimized_ops(disabled_fusions(cpu, cpu))
    assert "LayerNormalization" in optimized_ops(disabled_fusions(cpu, cpu))


def test_runtime_options_and_errors(tiny):
    model, onnx_model, folder = tiny
    assert onnx_model.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    one_thread = OnnxMultiTaskModel.from_pretrained(
        folder, threads=1, session_config={"session.intra_op.allow_spinning": "0"}
    )
    options = one_thread.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert one_thread.eval() is one_thread and "model.onnx" in repr(one_thread)
    assert onnx_model.task_names == model.task_names
    with pytest.raises(ValueError, match="bfloat16"):
        onnx_model.encode(TEXTS, precision="bfloat16")
    with pytest.raises(ValueError, match="unknown task"):
        onnx_model.predict(TEXTS, tasks=["nope"])
    with pytest.raises(ValueError, match="single texts"):
        onnx_model.predict(TEXTS, tasks=["nli"])
    with pytest.raises(ValueError, match="export_dir"):
        OnnxMultiTaskModel.from_pretrained("someone/some-model")
    with pytest.raises(FileNotFoundError):
        OnnxMultiTaskModel.from_pretrained(folder / "missing")


def test_export_on_first_use_and_again_after_the_checkpoint_changes(tiny_bert, tmp_path):
    torch.manual_seed(1)
    model = sharpen_heads(MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:3]).eval())
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="export=False"):
        OnnxMultiTaskModel.from_pretrained(tmp_path / "model", export=False)
    first = OnnxMultiTaskModel.from_pretrained(tmp_path / "model")
    graph = tmp_path / "model" / "onnx" / MODEL_FILE
    assert first.path == tmp_path / "model" / "onnx" and graph.is_file()
    assert max_diff(first.encode(TEXTS), model.encode(TEXTS)) < 1e-4
    written = graph.stat().st_mtime_ns
    OnnxMultiTaskModel.from_pretrained(tmp_path / "model")  # up to date: loaded, not exported again
    assert graph.stat().st_mtime_ns == written
    with pytest.raises(FileNotFoundError, match="int8"):
        OnnxMultiTaskModel._load(tmp_path / "model" / "onnx", int8=True, threads=None, providers=None)

    with torch.no_grad():  # retrain (here: change the sentiment head) and save into the same folder
        model.heads["sentiment"].out_proj.bias.add_(torch.tensor([5.0, -5.0]))
    model.save_pretrained(tmp_path / "model")
    again = OnnxMultiTaskModel.from_pretrained(tmp_path / "model", int8=True)
    assert again.int8 and (tmp_path / "model" / "onnx" / INT8_FILE).is_file()
    fresh = OnnxMultiTaskModel.from_pretrained(tmp_path / "model")
    for want, have in zip(model.predict(TEXTS), fresh.predict(TEXTS)):
        assert_same_predictions(want, have)
    assert {result["sentiment"]["label"] for result in fresh.predict(TEXTS)} == {"negative"}


def test_an_export_of_a_model_that_has_changed_since_is_refused(tiny_bert, tmp_path):
    """An export folder loaded by itself was served whatever became of its model since: it records its source
    folder's content hash and is refused when that folder now holds another model; a copy of the export whose source
    is not here (deployed alone), or a copied source folder with new modification times, is taken as it is."""
    torch.manual_seed(1)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:3]).eval()
    model.save_pretrained(tmp_path / "model")
    export_onnx(str(tmp_path / "model"), tmp_path / "export")
    OnnxMultiTaskModel.from_pretrained(tmp_path / "export")  # current
    os.utime(tmp_path / "model" / "model.safetensors", ns=(1, 1))  # same contents, other times: the same model
    OnnxMultiTaskModel.from_pretrained(tmp_path / "export")
    shutil.copytree(tmp_path / "export", tmp_path / "deployed")
    with torch.no_grad():  # a head retrained on the frozen encoder: a few bytes of the weights change
        model.heads["sentiment"].out_proj.bias.add_(1.0)
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(FileError, match=r"export is an ONNX export of .*model, which holds another model now"):
        OnnxMultiTaskModel.from_pretrained(tmp_path / "export")
    shutil.rmtree(tmp_path / "model")
    assert OnnxMultiTaskModel.from_pretrained(tmp_path / "deployed").task_names == model.config.task_names


def test_cli_functions_export_and_report_errors(tiny, tmp_path, capsys):
    model, _, _ = tiny
    model.save_pretrained(tmp_path / "model")
    parser = add_export_arguments(argparse.ArgumentParser(prog="mtl export"))
    (tmp_path / "calibration.txt").write_text("\n".join(TEXTS * 3), encoding="utf-8")
    argv = [str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--int8", "--calibration-file"]
    args = parser.parse_args([*argv, str(tmp_path / "calibration.txt")])
    assert run_export(args) == 0
    assert "model.onnx" in capsys.readouterr().err
    assert {MODEL_FILE, INT8_FILE, PAIR_HEADS_FILE, ONNX_CONFIG_NAME} <= set(os.listdir(tmp_path / "out"))
    description = json.loads((tmp_path / "out" / ONNX_CONFIG_NAME).read_text())
    assert description["quantization"]["calibration_texts"] == len([t for t in TEXTS * 3 if t.strip()])
    exported = OnnxMultiTaskModel.from_pretrained(tmp_path / "out", int8=True)
    assert exported.int8 and exported.task_names == model.task_names

    # An export into another model's folder would replace its config and tokenizer: refused, nothing written.
    model.save_pretrained(tmp_path / "other")
    before = {path.name: path.read_bytes() for path in (tmp_path / "other").iterdir() if path.is_file()}
    assert run_export(parser.parse_args([str(tmp_path / "model"), "-o", str(tmp_path / "other"), "-q"])) == 1
    assert "holds a model's weights: an export there would replace" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (tmp_path / "other").iterdir() if path.is_file()} == before

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    latin1 = [str(tmp_path / "model"), "-o", str(tmp_path / "o3"), "--int8", "--calibration-file"]
    assert run_export(parser.parse_args([*latin1, str(tmp_path / "latin1.txt")])) == 1
    err = capsys.readouterr().err
    assert "--calibration-file" in err and "not UTF-8 text" in err and "Traceback" not in err

    args = parser.parse_args([str(tmp_path / "missing"), "-o", str(tmp_path / "out2"), "-q"])
    assert run_export(args) == 1
    assert "mtl export: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path / "model"), "--quantization", "nope"])
    assert SCHEMES == tuple(QUANTIZATION)
    # The command-line half stays light: the `mtl` parser can import it without torch.
    probe = "import sys, multitask_st.onnx.cli; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------------------------- real model


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="module")
def minilm(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 with seeded random heads (a sentence task, a token task, a pair task), exported once."""
    torch.manual_seed(0)
    tasks = [
        {"name": "sentiment", "labels": ["negative", "positive"]},
        {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]},
        {"name": "nli", "type": "pair_classification", "labels": ["e", "n", "c"]},
    ]
    model = sharpen_heads(MultiTaskModel.from_backbone(minilm_dir, tasks=tasks).eval(), factor=5.0)
    folder = export_onnx(model, tmp_path_factory.mktemp("minilm") / "export", int8=True)
    return model, OnnxMultiTaskModel.from_pretrained(folder), OnnxMultiTaskModel.from_pretrained(folder, int8=True)


def test_minilm_embeddings_and_predictions_match_pytorch(minilm, shared_data):
    model, onnx_model, _ = minilm
    stsb = read_jsonl(shared_data / "stsb" / "test.jsonl")[:100]
    sentences = [row["sentence1"] for row in stsb] + [
        row["sentence"] for row in read_jsonl(shared_data / "sst2" / "validation.jsonl")[:100]
    ]
    assert max_diff(onnx_model.encode(sentences), model.encode(sentences)) < 1e-4
    assert max_diff(np.stack([onnx_model.encode(s) for s in sentences[:10]]), model.encode(sentences[:10])) < 1e-4
    words = [row["tokens"] for row in read_jsonl(shared_data / "wikiann-en" / "test.jsonl")[:60]]
    for inputs in (sentences[100:160], words, [(row["sentence1"], row["sentence2"]) for row in stsb[:40]]):
        for want, have in zip(model.predict(inputs), onnx_model.predict(inputs)):
            assert_same_predictions(want, have)
    entities = sum(len(result["ner"]["entities"]) for result in onnx_model.predict(words))
    assert entities > 0  # spans were compared, not two empty lists


def test_minilm_int8_keeps_sts_quality(minilm, shared_data):
    from scipy.stats import spearmanr

    _, onnx_model, int8 = minilm
    rows = read_jsonl(shared_data / "stsb" / "test.jsonl")[:500]
    texts = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
    gold = [row["score"] for row in rows]

    def spearman(embeddings: np.ndarray) -> float:
        return float(spearmanr((embeddings[: len(rows)] * embeddings[len(rows) :]).sum(1), gold).statistic) * 100

    quantization = int8.description["quantization"]  # outlier channels were found, and split off exactly
    assert quantization["outlier_channels"] and quantization["split_max_abs_diff"] < 1e-4
    # Every split layer still adds its bias straight to the quantised product (so onnxruntime folds it into the
    # matmul), and the float32 outlier product after it.
    nodes = onnx.load(str(int8.path / int8.file_name)).graph.node
    producers = {output: node for node in nodes for output in node.output}
    sums = [node for node in nodes if node.name.endswith("/outlier_add")]
    assert len(sums) == len(quantization["outlier_channels"])
    # FFN second matmuls took their outliers from the FFN input (silenced GELU units recomputed on the side).
    assert any(node.name.endswith("/outlier_pre_matmul") for node in nodes)
    for node in sums:
        bias_add = producers[node.input[0]]
        assert bias_add.op_type == "Add" and bias_add.input[0].endswith("/inlier_product")
    reference, quantized = onnx_model.encode(texts), int8.encode(texts)
    cosines = (reference * quantized).sum(1)
    assert cosines.mean() > 0.996 and cosines.min() > 0.98
    assert abs(spearman(quantized) - spearman(reference)) < 0.3


def test_mtl_export_and_the_onnx_backend_from_the_command_line(tiny, tiny_bert, tmp_path, capsys):
    from multitask_st.cli import main as mtl

    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:1]).eval()
    model.save_pretrained(tmp_path / "model")
    assert mtl(["export", str(tmp_path / "model"), "-o", str(tmp_path / "onnx"), "-q"]) == 0
    assert (tmp_path / "onnx" / MODEL_FILE).is_file()
    texts = ["John Smith works for Acme.", "I loved it"]
    for backend, folder in (("onnx", tmp_path / "onnx"), ("torch", tmp_path / "model")):
        assert (
            mtl(
                [
                    "encode",
                    *texts,
                    "--model",
                    str(folder),
                    "--backend",
                    backend,
                    "-o",
                    str(tmp_path / f"{backend}.npy"),
                    "-q",
                ]
            )
            == 0
        )
    assert max_diff(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy")) < 1e-4
    capsys.readouterr()
    assert mtl(
        [
            "encode",
            "x",
            "--model",
            str(tmp_path / "onnx"),
            "--backend",
            "onnx",
            "--device",
            "cuda",
            "-o",
            str(tmp_path / "x.npy"),
        ]
    ) in (1, 2)
    assert "--device cuda" in capsys.readouterr().err  # refused before anything loads


def test_heads_with_their_own_adapter_pooling_and_top_layers_export_exactly(tiny_bert, tmp_path):
    tasks = [
        {"name": "topic", "labels": ["a", "b"], "head": {"type": "transformer", "pooling": "attention"}},
        {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER"], "head": "transformer"},
        {"name": "tags", "type": "token_classification", "labels": ["O", "X"], "head": {"layers": 1}},
        {"name": "mood", "labels": ["a", "b"], "head": {"layers": 2, "pooling": "attention"}},
    ]
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=tasks).eval()
    with torch.no_grad():  # the heads' own top layers start as copies: move them so that they differ from the shared
        for parameter in model.heads["tags"].branch.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    sharpen_heads(model)
    onnx_model = OnnxMultiTaskModel.from_pretrained(export_onnx(model, tmp_path / "export"))
    for want, have in zip(model.predict(TEXTS), onnx_model.predict(TEXTS)):
        assert_same_predictions(want, have)
