"""The `cross_encoder` task type: a pair scored by one joint pass of the shared encoder (`[CLS] a [SEP] b [SEP]`,
token type ids marking the second text), as sentence-transformers' `CrossEncoder` scores pairs. Config, forward
pass, data rows, training, metrics, save/load, pipeline, ONNX, HTTP and the command line: the same paths as the other
task types, through the type's class alone."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
import torch
from test_service import ServerThread
from train_helpers import pair_files
from transformers import AutoTokenizer, pipeline

from modeling_mtl import MultiTaskConfig, MultiTaskModel
from validation_mtl import InputError

TASKS = [
    {"name": "topic", "labels": ["a", "b"]},
    {"name": "rerank", "type": "cross_encoder", "score_range": [0, 5]},
    {"name": "para", "type": "cross_encoder", "labels": ["no", "yes"]},
    {"name": "sts", "type": "similarity", "score_range": [0, 5]},
]
PAIRS = [("A man plays a guitar.", "Someone makes music."), ("The cat sleeps.", "Stocks fell sharply today.")]


@pytest.fixture(scope="module")
def model(tiny_bert):
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS).eval()
    with torch.no_grad():  # heads that decide by clear margins: two backends then agree on labels, not on ties
        for head in model.heads.values():
            head.out_proj.weight.mul_(20)
    return model


def joint_logits(model, name, pairs, token_types=True):
    """A task's logits from the tokenizer's own pair encoding, run through `forward` by hand."""
    batch = model.tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True, return_tensors="pt"
    )
    if not token_types:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        return model(**batch, tasks=[name]).logits[name]


def test_config_one_label_scores_pairs_several_labels_classify_them(tiny_bert):
    config = MultiTaskConfig(backbone_config={"model_type": "bert"}, tasks=TASKS)
    rerank, para = config.task("rerank"), config.task("para")
    assert config.get_task("rerank")["labels"] == ["score"] and config.get_task("rerank")["score_range"] == [0.0, 5.0]
    assert rerank.scores_pairs and rerank.takes_pairs and not rerank.trains_embedding
    assert not para.scores_pairs and "score_range" not in config.get_task("para")
    assert (rerank.primary_metric, para.primary_metric) == ("spearman", "macro_f1")
    with pytest.raises(InputError, match="score_range only applies to a cross_encoder with one score label"):
        MultiTaskConfig(tasks=[{**TASKS[2], "score_range": [0, 1]}])


def test_predict_scores_the_pair_encoded_together_as_the_tokenizer_encodes_it(model):
    predictions = model.predict(PAIRS, tasks=["rerank", "para"])
    logits = joint_logits(model, "rerank", PAIRS)
    for prediction, logit in zip(predictions, logits):
        assert prediction["rerank"]["score"] == pytest.approx(float(torch.sigmoid(logit[0])), abs=1e-6)
    para = joint_logits(model, "para", PAIRS).softmax(-1)
    assert [p["para"]["label"] for p in predictions] == [["no", "yes"][int(i)] for i in para.argmax(-1)]
    # The second text's token type ids reach the encoder: zeroed, the scores change.
    assert not torch.allclose(joint_logits(model, "rerank", PAIRS, token_types=False), logits, atol=1e-4)
    # By default pairs go to every pair task, texts to every text task; one [a, b] list is one pair.
    assert set(model.predict(PAIRS[0])) == {"rerank", "para", "sts"}
    assert model.predict(list(PAIRS[0]), tasks=["rerank"]) == model.predict(PAIRS[0], tasks=["rerank"])
    with pytest.raises(InputError, match=r"task\(s\) \['rerank'\] take text pairs"):
        model.predict("one text", tasks=["rerank"])


def test_an_encoder_without_token_types_scores_pairs_too(tiny_backbones):
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_backbones["distilbert"], tasks=TASKS[1:2]).eval()
    assert not model.takes_token_type_ids
    batch = model.tokenizer([PAIRS[0][0]], [PAIRS[0][1]], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        logit = model(**batch).logits["rerank"][0, 0]
    assert model.predict(PAIRS[0])["rerank"]["score"] == pytest.approx(float(torch.sigmoid(logit)), abs=1e-6)


def build(tiny_bert, tmp_path, tasks):
    from multitask_st.data import build_datasets, parse_task_specs

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return build_datasets(parse_task_specs(tasks), tokenizer, 32), tokenizer


def test_training_rows_hold_the_joint_encoding_and_its_token_types(tiny_bert, tmp_path):
    files = pair_files(tmp_path / "pairs")
    tasks = [
        {
            "name": "rerank",
            "type": "cross_encoder",
            "data_files": files,
            "label_column": "score",
            "score_range": [0, 5],
        },
        {"name": "para", "type": "pair_classification", "data_files": files, "label_column": "label"},
    ]
    data, tokenizer = build(tiny_bert, tmp_path, tasks)
    rows = [json.loads(line) for line in open(files["train"])]
    # The same file read twice: encoded jointly for the cross-encoder, text by text for the bi-encoder task.
    assert data.source_tasks == [["rerank"], ["para"]] and data.source_sizes == [12, 12]
    first = data.train[0]
    expected = tokenizer(rows[0]["sentence1"], rows[0]["sentence2"], truncation=True, max_length=32)
    assert first["input_ids"] == [expected["input_ids"]]
    assert first["token_type_ids"] == [expected["token_type_ids"]] and 1 in first["token_type_ids"][0]
    assert first["labels"]["rerank"] == rows[0]["score"] and first["labels"]["para"] == -100
    bi_encoder_row = data.train[12]
    assert len(bi_encoder_row["input_ids"]) == 2 and bi_encoder_row["token_type_ids"] == [[], []]
    assert math.isnan(bi_encoder_row["labels"]["rerank"])
    from multitask_st.data import MultiTaskCollator

    collator = MultiTaskCollator(tokenizer, [spec.model_task() for spec in data.specs])
    batch = collator([data.train[i] for i in range(3)])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["labels"]["rerank"].dtype == torch.float32


def test_a_score_outside_the_range_names_the_row(tiny_bert, tmp_path):
    from validation_mtl import DataError

    files = pair_files(tmp_path / "pairs")
    task = {"name": "rerank", "type": "cross_encoder", "data_files": files, "label_column": "score"}  # range [0, 1]
    with pytest.raises(DataError, match=r"task 'rerank': score 2.0 in train row 2, column 'score' is outside"):
        build(tiny_bert, tmp_path, [task])


def test_the_loss_is_binary_cross_entropy_on_the_score_mapped_to_the_unit_range(model):
    batch = model.tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    scores = torch.tensor([5.0, 1.0])
    with torch.no_grad():
        out = model(**batch, labels={"rerank": scores, "para": torch.tensor([1, 0])})
        logits = out.logits["rerank"][:, 0]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, scores / 5)
    torch.testing.assert_close(out.task_losses["rerank"], expected)
    expected_para = torch.nn.functional.cross_entropy(out.logits["para"], torch.tensor([1, 0]))
    torch.testing.assert_close(out.task_losses["para"], expected_para)
    with pytest.raises(InputError, match="gold scores must be finite and within its score_range"):
        model(**batch, labels={"rerank": torch.tensor([6.0, 1.0])})


def test_train_evaluate_save_and_serve_it_like_any_task(tiny_bert, tmp_path):
    import train

    files = pair_files(tmp_path / "pairs", train=24, evaluation=8)
    tasks = [
        {
            "name": "rerank",
            "type": "cross_encoder",
            "data_files": files,
            "label_column": "score",
            "score_range": [0, 5],
        },
        {"name": "para", "type": "cross_encoder", "data_files": files, "label_column": "label", "labels": ["0", "1"]},
        {"name": "sts", "type": "similarity", "data_files": files, "label_column": "score", "score_range": [0, 5]},
    ]
    from train_helpers import train_flags

    output = tmp_path / "out"
    assert train.main([*train_flags(tiny_bert, tasks, output), "--max_steps", "6", "--eval_strategy", "no"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())["eval"]
    assert {"spearman", "pearson"} <= set(metrics["rerank"]) and {"accuracy", "macro_f1"} <= set(metrics["para"])
    card = (output / "README.md").read_text()
    assert "cross_encoder" in card and "cross-encoder" in card
    loaded = MultiTaskModel.from_pretrained(output).eval()
    assert set(loaded.predict(PAIRS[0])) == {"rerank", "para", "sts"}
    # The standard pipeline serves it with text pairs, with the sigmoid `predict` applies.
    classifier = pipeline(
        "text-classification", model=str(output), model_kwargs={"pipeline_task": "rerank"}, trust_remote_code=True
    )
    served = classifier({"text": PAIRS[0][0], "text_pair": PAIRS[0][1]})
    assert served["score"] == pytest.approx(loaded.predict(PAIRS[0], tasks=["rerank"])["rerank"]["score"], abs=1e-5)
    # Over HTTP: /info says it takes pairs; /predict with pairs gives what `predict` gives.
    from multitask_st.service import create_app

    with ServerThread(create_app(loaded)) as url:
        info = httpx.get(url + "/info").json()
        assert {t["name"]: t["input"] for t in info["tasks"]}["rerank"] == "pair"
        response = httpx.post(url + "/predict", json={"pairs": [list(pair) for pair in PAIRS], "tasks": ["rerank"]})
        assert response.status_code == 200, response.text
        expected = loaded.predict(PAIRS, tasks=["rerank"])
        assert [p["rerank"]["score"] for p in response.json()["predictions"]] == pytest.approx(
            [p["rerank"]["score"] for p in expected], abs=1e-6
        )


def test_the_command_line_scores_pairs(model, tmp_path, capsys):
    from multitask_st.cli import main

    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "p.json"
    assert (
        main(["predict", "--model", str(tmp_path / "model"), "--pair", *PAIRS[0], "--tasks", "rerank", "-o", str(out)])
        == 0
    )
    row = json.loads(out.read_text())[0]
    assert row["predictions"]["rerank"]["score"] == pytest.approx(model.predict(PAIRS[0])["rerank"]["score"], abs=1e-6)


def test_the_onnx_export_scores_pairs_as_pytorch_does(model, tmp_path):
    pytest.importorskip("onnxruntime")
    from multitask_st.onnx import OnnxMultiTaskModel, export_onnx

    folder = export_onnx(model, tmp_path / "export")
    description = json.loads((folder / "onnx_config.json").read_text())
    assert description["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {"logits.rerank", "logits.para"} <= set(description["outputs"])
    onnx_model = OnnxMultiTaskModel.from_pretrained(folder)
    got, want = onnx_model.predict(PAIRS), model.predict(PAIRS)
    for a, b in zip(got, want):
        assert a["rerank"]["score"] == pytest.approx(b["rerank"]["score"], abs=1e-4)
        assert a["para"]["label"] == b["para"]["label"]
        assert a["sts"]["cosine"] == pytest.approx(b["sts"]["cosine"], abs=1e-4)
    np.testing.assert_allclose(onnx_model.encode(["x y"]), model.encode(["x y"]), atol=1e-4)


def test_an_encoder_with_one_token_type_exports_pairs_without_segments(tiny_backbones, tmp_path):
    """RoBERTa-style encoders have one token type (`type_vocab_size` 1): the pair's segments are left out, in
    PyTorch and in the export (a segment of 1 would index past their one type embedding)."""
    pytest.importorskip("onnxruntime")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from multitask_st.onnx import OnnxMultiTaskModel, export_onnx

    config = AutoConfig.from_pretrained(tiny_backbones["roberta"], type_vocab_size=1)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "roberta1")
    AutoTokenizer.from_pretrained(tiny_backbones["roberta"]).save_pretrained(tmp_path / "roberta1")
    model = MultiTaskModel.from_backbone(tmp_path / "roberta1", tasks=TASKS[1:2]).eval()
    assert not model.takes_token_type_ids
    folder = export_onnx(model, tmp_path / "export")
    assert json.loads((folder / "onnx_config.json").read_text())["inputs"] == ["input_ids", "attention_mask"]
    got = OnnxMultiTaskModel.from_pretrained(folder).predict(PAIRS)
    for a, b in zip(got, model.predict(PAIRS)):
        assert a["rerank"]["score"] == pytest.approx(b["rerank"]["score"], abs=1e-4)
