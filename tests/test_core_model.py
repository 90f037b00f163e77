"""MultiTaskModel: pooling, heads, losses, save/load, encode/predict, bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from configuration_mtl import POOLING_MODES
from modeling_mtl import MultiTaskModel, MultiTaskModelOutput, Pooling, group_entities

TASKS = [
    {"name": "topic", "labels": ["sports", "politics", "science"], "head": {"type": "mlp", "hidden_size": 16}},
    {"name": "tags", "type": "multi_label_classification", "labels": ["a", "b", "c"]},
    {
        "name": "ner",
        "type": "token_classification",
        "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
        "loss_weight": 0.5,
    },
    {"name": "score", "type": "regression", "loss_weight": 2.0},
]
SENTENCES = ["John Smith works for Acme Corporation in New York.", "I loved this movie!", "What is the capital?"]


@pytest.fixture(scope="module")
def model(tiny_bert):
    torch.manual_seed(0)
    return MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS).eval()


def batch_for(model, texts):
    return model.tokenize(texts, return_token_type_ids=False)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_ignores_padding(mode):
    torch.manual_seed(0)
    pooling = Pooling(mode, hidden_size=8)
    states = torch.randn(1, 5, 8)
    mask = torch.ones(1, 5, dtype=torch.long)
    # The same sentence with three padded positions holding arbitrary (large) values.
    padded_states = torch.cat([states, 100 * torch.randn(1, 3, 8)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(pooling(states, mask), pooling(padded_states, padded_mask), rtol=0, atol=1e-6)


def test_pooling_values():
    states = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [50.0, 50.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert Pooling("mean", 2)(states, mask).tolist() == [[2.0, 1.0]]
    assert Pooling("max", 2)(states, mask).tolist() == [[3.0, 4.0]]
    assert Pooling("cls", 2)(states, mask).tolist() == [[1.0, -2.0]]
    assert Pooling("last_token", 2)(states, mask).tolist() == [[3.0, 4.0]]
    torch.testing.assert_close(Pooling("mean_sqrt_len", 2)(states, mask), torch.tensor([[4.0, 2.0]]) / 2**0.5)
    # weights 1 and 2 for positions 1 and 2
    torch.testing.assert_close(Pooling("weighted_mean", 2)(states, mask), torch.tensor([[7.0 / 3, 6.0 / 3]]))


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_embedding_does_not_depend_on_batch_mates(tiny_bert, mode):
    model = MultiTaskModel.from_backbone(tiny_bert, pooling=mode).eval()
    alone = model.encode(["short one"], batch_size=1)
    together = model.encode(["short one", "a much longer sentence that forces padding on the short one"], batch_size=2)
    np.testing.assert_allclose(alone[0], together[0], atol=1e-5)


# ---------------------------------------------------------------- structure and forward


def test_backbone_pooler_is_not_built(model):
    assert getattr(model.backbone, "pooler", None) is None
    assert not any("pooler" in name for name, _ in model.named_parameters())
    assert set(model.heads) == {"topic", "tags", "ner", "score"}


def test_forward_shapes_and_subset(model):
    batch = batch_for(model, SENTENCES)
    out = model(**batch)
    assert isinstance(out, MultiTaskModelOutput)
    seq = batch["input_ids"].shape[1]
    assert out.embeddings.shape == (3, 32)
    assert out.logits["topic"].shape == (3, 3)
    assert out.logits["tags"].shape == (3, 3)
    assert out.logits["ner"].shape == (3, seq, 5)
    assert out.logits["score"].shape == (3, 1)
    assert out.loss is None and out.task_losses is None

    only = model(**batch, tasks=["ner"])
    assert list(only.logits) == ["ner"]
    torch.testing.assert_close(only.logits["ner"], out.logits["ner"])
    # A head that is not asked for is not run: it gets no gradient.
    model.zero_grad()
    model(**batch, tasks=["topic"]).logits["topic"].sum().backward()
    assert all(p.grad is None for p in model.heads["ner"].parameters())
    assert all(p.grad is not None for p in model.heads["topic"].parameters())
    model.zero_grad()


def test_loss_is_weighted_sum_over_labelled_items_only(model):
    batch = batch_for(model, SENTENCES)
    seq = batch["input_ids"].shape[1]
    ner = torch.full((3, seq), -100)
    ner[0, 1:4] = torch.tensor([1, 2, 0])
    labels = {
        "topic": torch.tensor([0, -100, 2]),  # the second sentence has no topic label
        "tags": torch.tensor([[1.0, 0.0, 1.0], [-100, -100, -100], [0.0, 1.0, 0.0]]),
        "ner": ner,
        "score": torch.tensor([0.5, float("nan"), 3.0]),
    }
    out = model(**batch, labels=labels)
    logits = out.logits
    expected = {
        "topic": torch.nn.functional.cross_entropy(logits["topic"][[0, 2]], torch.tensor([0, 2])),
        "tags": torch.nn.functional.binary_cross_entropy_with_logits(logits["tags"][[0, 2]], labels["tags"][[0, 2]]),
        "ner": torch.nn.functional.cross_entropy(logits["ner"][0, 1:4], torch.tensor([1, 2, 0])),
        "score": torch.nn.functional.mse_loss(logits["score"][[0, 2], 0], torch.tensor([0.5, 3.0])),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.task_losses[name], value)
    total = expected["topic"] + expected["tags"] + 0.5 * expected["ner"] + 2.0 * expected["score"]
    torch.testing.assert_close(out.loss, total)


def test_labels_for_some_tasks_only_and_fully_unlabelled_batches(model):
    batch = batch_for(model, SENTENCES)
    out = model(**batch, labels={"topic": torch.tensor([-100, -100, -100]), "score": torch.tensor([1.0, 2.0, 3.0])})
    assert set(out.task_losses) == {"topic", "score"}
    assert out.task_losses["topic"].item() == 0.0
    # The zero still reaches every parameter of every head, so DDP never meets an unused parameter.
    model.zero_grad()
    full = model(
        **batch,
        labels={name: None for name in []}
        or {
            "topic": torch.tensor([-100, -100, -100]),
            "tags": torch.full((3, 3), -100.0),
            "ner": torch.full(batch["input_ids"].shape, -100),
            "score": torch.tensor([1.0, 2.0, 3.0]),
        },
    )
    full.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    model.zero_grad()


def test_num_items_in_batch_rescales(model):
    batch = batch_for(model, SENTENCES)
    labels = {"topic": torch.tensor([0, 1, 2])}
    plain = model(**batch, labels=labels).task_losses["topic"]
    scaled = model(**batch, labels=labels, num_items_in_batch={"topic": 6}).task_losses["topic"]
    torch.testing.assert_close(scaled, plain * 3 / 6)


def test_bad_labels_and_tasks_give_clear_errors(model):
    batch = batch_for(model, SENTENCES)
    with pytest.raises(ValueError, match=r"task 'topic': label id 7 is out of range; valid ids are 0..2"):
        model(**batch, labels={"topic": torch.tensor([0, 7, 1])})
    with pytest.raises(ValueError, match=r"label id -3 is out of range"):
        model(**batch, labels={"topic": torch.tensor([0, -3, 1])})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sentiment'\]; this model's tasks are"):
        model(**batch, tasks=["sentiment"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        model(**batch, labels={"nope": torch.tensor([0, 1, 0])})
    with pytest.raises(ValueError, match=r"task 'topic': labels have shape \(2,\), expected \(3,\)"):
        model(**batch, labels={"topic": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match=r"multi-label targets must be 0 or 1"):
        model(**batch, labels={"tags": torch.full((3, 3), 0.5)})
    with pytest.raises(ValueError, match="excludes"):
        model(**batch, tasks=["ner"], labels={"topic": torch.tensor([0, 1, 0])})
    with pytest.raises(TypeError, match="`labels` must be a dict"):
        model(**batch, labels=torch.tensor([0, 1, 0]))


def test_projection_normalisation_and_attention_pooling(tiny_bert):
    model = MultiTaskModel.from_backbone(
        tiny_bert, tasks=TASKS[:1], projection_dim=8, normalize=True, pooling="attention"
    ).eval()
    embeddings = model.encode(SENTENCES)
    assert embeddings.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    raw = model.encode(SENTENCES, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    assert model.heads["topic"].dense.in_features == 8  # sequence heads read the projected vector


# ---------------------------------------------------------------- encode / predict / bad input


def test_encode_contract(model):
    empty = model.encode([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    assert model.encode([], convert_to_tensor=True).shape == (0, 32)
    single = model.encode("hello there")
    assert single.shape == (32,)
    many = model.encode(SENTENCES + ["", "hello there"], batch_size=2)
    assert many.shape == (5, 32) and np.isfinite(many).all()
    np.testing.assert_allclose(many[4], single, atol=1e-6)  # input order kept despite length sorting
    tensor = model.encode(SENTENCES, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), many[:3], atol=1e-6)
    with pytest.raises(TypeError, match=r"sentences\[1\] must be a str, got int"):
        model.encode(["fine", 3])
    with pytest.raises(TypeError, match=r"sentences\[0\] must be a str, got NoneType"):
        model.encode([None])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.encode(["x"], batch_size=0)


def test_long_texts_truncate_at_max_seq_length(tiny_bert):
    model = MultiTaskModel.from_backbone(tiny_bert, max_seq_length=16).eval()
    long_text = " ".join(["movie"] * 200)
    assert model.tokenize([long_text])["input_ids"].shape[1] == 16
    # Everything past the limit is ignored: changing the tail changes nothing.
    np.testing.assert_allclose(
        model.encode(long_text), model.encode(long_text + " totally different ending"), atol=1e-6
    )


def test_predict_formats(model):
    text = "John Smith works for Acme Corporation in New York."
    result = model.predict(text)
    assert set(result) == {"topic", "tags", "ner", "score"}
    topic = result["topic"]
    assert topic["label"] in TASKS[0]["labels"]
    assert abs(sum(topic["scores"].values()) - 1) < 1e-5
    assert topic["score"] == max(topic["scores"].values())
    tags = result["tags"]
    assert set(tags["scores"]) == {"a", "b", "c"}
    assert tags["labels"] == [label for label, p in tags["scores"].items() if p >= 0.5]
    assert isinstance(result["score"]["value"], float)
    words = result["ner"]["words"]
    # One tag per word (not per sub-token), with character offsets into the input text.
    assert [w["word"] for w in words] == [
        "John",
        "Smith",
        "works",
        "for",
        "Acme",
        "Corporation",
        "in",
        "New",
        "York",
        ".",
    ]
    for word in words:
        assert text[word["start"] : word["end"]] == word["word"]
        assert word["tag"] in TASKS[2]["labels"]
    for entity in result["ner"]["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["text"]

    subset = model.predict(["a", "b"], tasks=["score"])
    assert [set(r) for r in subset] == [{"score"}, {"score"}]
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sentiment'\]; this model's tasks are \['topic'"):
        model.predict("x", tasks=["sentiment"])
    assert model.predict([]) == []


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_predict_batched_equals_one_at_a_time(model, padding_side):
    # Sentences of very different lengths land in different padded batches; every prediction (token tags and
    # scores included) must equal the one made for the sentence alone. Batches are always padded on the right,
    # so a tokenizer set to pad on the left (which would shift BERT's absolute positions) changes nothing.
    long = "Maria Lopez , who lives in Lyon with John Smith , works in Paris for Acme Corporation every day"
    # The last two differ by one word: within plan_batches' padding bound, so they share a padded batch.
    texts = SENTENCES + ["x", long, long.replace(" every day", " daily")]
    original = model.tokenizer.padding_side
    model.tokenizer.padding_side = padding_side
    try:
        batched = model.predict(texts, batch_size=4)
        alone = [model.predict(text) for text in texts]
    finally:
        model.tokenizer.padding_side = original
    tolerance = 1e-5
    for got, expected in zip(batched, alone):
        assert got["topic"]["label"] == expected["topic"]["label"]
        assert got["topic"]["score"] == pytest.approx(expected["topic"]["score"], abs=tolerance)
        assert got["score"]["value"] == pytest.approx(expected["score"]["value"], abs=tolerance)
        assert [(w["word"], w["tag"]) for w in got["ner"]["words"]] == [
            (w["word"], w["tag"]) for w in expected["ner"]["words"]
        ]
        assert [w["score"] for w in got["ner"]["words"]] == pytest.approx(
            [w["score"] for w in expected["ner"]["words"]], abs=tolerance
        )


def test_predict_pre_split_words(model):
    words = ["Maria", "Lopez", "visited", "Paris", "."]
    result = model.predict([words], tasks=["ner"])[0]["ner"]
    assert [w["word"] for w in result["words"]] == words
    text = " ".join(words)
    assert all(text[w["start"] : w["end"]] == w["word"] for w in result["words"])


def test_group_entities_bio_spans():
    text = "Maria Lopez flew to New York ."
    spans = [(0, 5), (6, 11), (12, 16), (17, 19), (20, 23), (24, 28), (29, 30)]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    words = [{"word": text[s:e], "start": s, "end": e, "tag": t, "score": 0.9} for (s, e), t in zip(spans, tags)]
    entities = group_entities(words, text)
    assert [(e["entity"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Maria Lopez", 0, 11),
        ("LOC", "New York", 20, 28),
    ]
    # A B- tag always starts a new entity; an I- of another type does too.
    words[1]["tag"] = "B-PER"
    words[5]["tag"] = "I-ORG"
    assert [e["text"] for e in group_entities(words, text)] == ["Maria", "Lopez", "New", "York"]


# ---------------------------------------------------------------- save / load / families


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "modernbert"])
def test_backbone_families_encode_forward_save_load(tiny_backbones, family, tmp_path):
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_backbones[family], tasks=TASKS).eval()
    assert getattr(model.backbone, "pooler", None) is None
    before_embed = model.encode(SENTENCES)
    batch = batch_for(model, SENTENCES)
    before = model(**batch)
    out = model(**batch, labels={"topic": torch.tensor([0, 1, 2])})
    assert torch.isfinite(out.loss)

    model.save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    assert loaded.tokenizer is not None
    np.testing.assert_allclose(loaded.encode(SENTENCES), before_embed, atol=1e-6)
    after = loaded(**batch)
    for name in before.logits:
        torch.testing.assert_close(after.logits[name], before.logits[name])
    assert loaded.predict(SENTENCES[0])["ner"]["words"][0]["word"] == "John"


def test_saved_folder_contents_and_auto_model_without_remote_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {
        "config.json",
        "model.safetensors",
        "configuration_mtl.py",
        "modeling_mtl.py",
        "tokenizer_config.json",
    } <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mtl.MultiTaskConfig",
        "AutoModel": "modeling_mtl.MultiTaskModel",
    }
    # The copied code files are the project's own.
    root = Path(__file__).resolve().parent.parent
    assert (tmp_path / "modeling_mtl.py").read_text() == (root / "modeling_mtl.py").read_text()
    # With the package imported, the Auto classes resolve it locally (no trust_remote_code needed).
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is MultiTaskModel
    np.testing.assert_allclose(loaded.encode(SENTENCES), model.encode(SENTENCES), atol=1e-6)


def test_fresh_process_without_the_project_loads_with_trust_remote_code(model, tmp_path):
    save_dir = tmp_path / "saved"
    model.save_pretrained(save_dir)
    expected_embed = model.encode(SENTENCES)
    expected_predict = model.predict(SENTENCES)
    np.save(tmp_path / "expected.npy", expected_embed)
    script = textwrap.dedent(
        f"""
        import json, os, sys
        # Make sure the project's modules cannot be imported: only the copies in the folder may be used.
        sys.path = [p for p in sys.path if p and os.path.abspath(p) != {str(Path(__file__).resolve().parent.parent)!r}]
        sys.modules["modeling_mtl"] = None
        sys.modules["configuration_mtl"] = None
        import numpy as np
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(save_dir)!r}, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained({str(save_dir)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert tokenizer("hello")["input_ids"] == model.tokenizer("hello")["input_ids"]
        embeddings = model.encode({SENTENCES!r})
        print(json.dumps({{"max_diff": float(np.abs(embeddings - np.load({str(tmp_path / "expected.npy")!r})).max()),
                          "predict": model.predict({SENTENCES!r})}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_diff"] <= 1e-6
    for got, want in zip(report["predict"], expected_predict):
        assert got["topic"]["label"] == want["topic"]["label"]
        assert got["score"]["value"] == pytest.approx(want["score"]["value"], abs=1e-5)
        assert [w["tag"] for w in got["ner"]["words"]] == [w["tag"] for w in want["ner"]["words"]]


def test_sentence_transformers_checkpoint_settings_are_read(minilm_dir):
    model = MultiTaskModel.from_backbone(minilm_dir)
    assert (model.config.pooling, model.config.normalize, model.config.max_seq_length) == ("mean", True, 256)
    overridden = MultiTaskModel.from_backbone(minilm_dir, pooling="cls", normalize=False, max_seq_length=128)
    assert (overridden.config.pooling, overridden.config.normalize, overridden.config.max_seq_length) == (
        "cls",
        False,
        128,
    )


def test_plain_backbone_defaults(tiny_bert):
    model = MultiTaskModel.from_backbone(tiny_bert)
    assert (model.config.pooling, model.config.normalize) == ("mean", False)
    assert model.config.max_seq_length == 128  # min(tokenizer limit, position embeddings, 512)
    assert isinstance(model.tokenizer, type(AutoTokenizer.from_pretrained(tiny_bert)))


def test_gradient_checkpointing_and_bfloat16(tiny_bert):
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:1])
    model.gradient_checkpointing_enable()
    model.train()
    batch = batch_for(model, SENTENCES)
    model(**batch, labels={"topic": torch.tensor([0, 1, 2])}).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    half = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:1], dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half(**batch).logits["topic"].dtype == torch.bfloat16
    assert half.encode(SENTENCES).dtype == np.float32  # encode always hands back float32
