"""modeling_mtl: pooling, heads, forward on single texts and on text pairs, every loss (checked against a direct
computation), save/load across backbone families, remote code in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import SENTENCES, TEXT_TASKS
from transformers import AutoModel, AutoTokenizer

from configuration_mtl import POOLING_MODES
from io_mtl import model_code_files
from modeling_mtl import (
    IGNORE_INDEX,
    MultiTaskModel,
    MultiTaskModelOutput,
    Pooling,
    labelled_mask,
    resolve_max_seq_length,
    text_fingerprints,
)
from validation_mtl import FileError, InputError, InputTypeError, MissingFileError

TASKS = TEXT_TASKS


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
        "tags": torch.tensor([[1.0, 0.0, 1.0], [float("nan")] * 3, [0.0, 1.0, 0.0]]),
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
            "tags": torch.full((3, 3), float("nan")),
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
    with pytest.raises(ValueError, match=r"task 'topic': labels must be integer ids"):
        model(**batch, labels={"topic": torch.tensor([1.7, 0.0, 1.0])})  # a fractional class id is not truncated
    with pytest.raises(ValueError, match=r"task 'topic': labels must be integer ids"):
        model(**batch, labels={"topic": torch.tensor([float("nan"), 0.0, 1.0])})
    with pytest.raises(TypeError, match=r"task 'topic': labels must be numbers .* torch.bool"):
        model(**batch, labels={"topic": torch.tensor([True, False, True])})
    with pytest.raises(TypeError, match=r"task 'topic': labels must be a tensor, a numpy array or a list"):
        model(**batch, labels={"topic": ["a", "b", "c"]})
    # Lists and numpy arrays are fine.
    as_list = model(**batch, labels={"topic": [0, 1, 2]}).task_losses["topic"]
    as_array = model(**batch, labels={"topic": np.array([0, 1, 2])}).task_losses["topic"]
    torch.testing.assert_close(as_list, as_array)


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
    code = {
        "configuration_mtl.py",
        "modeling_mtl.py",
        "tasks_mtl.py",
        "layers_mtl.py",
        "inference_mtl.py",
        "validation_mtl.py",
        "io_mtl.py",
    }
    assert set(model_code_files()) == code  # what push_to_hub publishes is what save_pretrained copies
    assert {"config.json", "model.safetensors", "tokenizer_config.json", *code} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mtl.MultiTaskConfig",
        "AutoModel": "modeling_mtl.MultiTaskModel",
        "AutoModelForSequenceClassification": "modeling_mtl.MultiTaskModelForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_mtl.MultiTaskModelForTokenClassification",
    }
    assert json.loads((tmp_path / "modules.json").read_text())[1]["path"] == "1_Pooling"  # sentence-transformers
    # The tokenizer's config holds no options of the call that loaded it, and truncates where the model does.
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)
    assert tokenizer_config["model_max_length"] == model.config.max_seq_length
    # The copied code files are the project's own.
    root = Path(__file__).resolve().parent.parent
    for name in code:
        assert (tmp_path / name).read_text() == (root / name).read_text()
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
        sys.modules["inference_mtl"] = None
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


def test_gradient_checkpointing_recomputes_layers_and_bfloat16(tiny_bert):
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:1])
    # A module inside the checkpointed layer: its forward runs again when backward recomputes the layer.
    inner = model.backbone.encoder.layer[0].attention
    calls = []
    inner.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    batch = batch_for(model, SENTENCES)
    model(**batch, labels={"topic": torch.tensor([0, 1, 2])}).loss.backward()
    assert len(calls) == 1  # without checkpointing: one forward per layer
    model.zero_grad()
    calls.clear()
    model.activation_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model(**batch, labels={"topic": torch.tensor([0, 1, 2])}).loss.backward()
    assert len(calls) == 2, "checkpointing recomputes the layer's forward during backward"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    half = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:1], dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half(**batch).logits["topic"].dtype == torch.bfloat16
    assert half.encode(SENTENCES).dtype == np.float32  # encode always hands back float32


def test_one_resolver_for_the_truncation_length(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.model_max_length = int(1e30)  # a tokenizer without a limit cannot decide alone
    config = AutoModel.from_pretrained(tiny_bert).config  # 128 positions
    assert resolve_max_seq_length(config, tokenizer) == 128
    assert resolve_max_seq_length(config, tokenizer, {"max_seq_length": 64}) == 64
    assert resolve_max_seq_length(config, tokenizer, {"max_seq_length": 64}, requested=32) == 32
    assert MultiTaskModel.from_backbone(tiny_bert, tokenizer=tokenizer).config.max_seq_length == 128


def test_from_backbone_rejects_unknown_keyword_arguments(tiny_bert):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['poolling'\]"):
        MultiTaskModel.from_backbone(tiny_bert, poolling="cls")


def test_labelled_mask_is_the_one_rule():
    assert labelled_mask(torch.tensor([0, IGNORE_INDEX, 3])).tolist() == [True, False, True]
    assert labelled_mask(torch.tensor([0.0, float("nan"), -100.0])).tolist() == [True, False, True]


# ---------------------------------------------------------------- pair tasks

PAIR_TASKS = [
    {"name": "topic", "labels": ["sports", "politics", "science"]},
    {"name": "sts", "type": "similarity", "score_range": [0, 5]},
    {"name": "sts_mse", "type": "similarity", "loss": "cosine_mse", "score_range": [0, 5]},
    {"name": "paraphrase", "type": "pair_classification", "labels": ["no", "yes"]},
    {"name": "retrieval", "type": "contrastive", "scale": 20},
]
LEFT = ["A man plays a guitar.", "The market fell sharply.", "What is the capital of France?", "I loved it"]
RIGHT = ["Someone plays music.", "Stocks dropped on Monday.", "Which city is France's capital?", "Great film"]


@pytest.fixture(scope="module")
def pair_model(tiny_bert):
    torch.manual_seed(0)
    return MultiTaskModel.from_backbone(tiny_bert, tasks=PAIR_TASKS, normalize=True).eval()


def pair_batch(model, left, right, negatives=None):
    """(batch, texts, seq) inputs, the way MultiTaskCollator builds them: every text padded to one length."""
    sides = [left, right] + ([negatives] if negatives else [])
    flat = model.tokenize([text for side in sides for text in side], return_token_type_ids=False)
    rows = len(left)
    reshape = lambda t: t.view(len(sides), rows, -1).transpose(0, 1)  # noqa: E731
    return {"input_ids": reshape(flat["input_ids"]), "attention_mask": reshape(flat["attention_mask"])}


def test_both_sides_of_a_pair_go_through_the_encoder_in_one_pass(pair_model):
    calls = []
    handle = pair_model.backbone.register_forward_hook(lambda _m, _i, out: calls.append(out.last_hidden_state.shape))
    try:
        out = pair_model(**pair_batch(pair_model, LEFT, RIGHT))
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0][0] == 2 * len(LEFT)
    assert out.embeddings.shape == (4, 2, 32)
    expected = torch.from_numpy(pair_model.encode(LEFT + RIGHT)).view(2, 4, 32).transpose(0, 1)
    torch.testing.assert_close(out.embeddings, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits["sts"], (expected[:, 0] * expected[:, 1]).sum(-1), atol=1e-5, rtol=1e-4)
    # The pair head reads the *pre-normalisation* features, as the SBERT classifier does.
    u, v = (torch.from_numpy(pair_model.encode(side, normalize=False)) for side in (LEFT, RIGHT))
    head_input = torch.cat([u, v, (u - v).abs()], dim=-1)
    torch.testing.assert_close(
        out.logits["paraphrase"], pair_model.heads["paraphrase"](head_input), atol=1e-5, rtol=1e-4
    )
    # Sequence heads read each row's first text.
    torch.testing.assert_close(out.logits["topic"], pair_model.heads["topic"](u), atol=1e-5, rtol=1e-4)


def test_absent_texts_of_a_mixed_batch_are_not_encoded(pair_model):
    batch = pair_batch(pair_model, LEFT, RIGHT)
    batch["input_ids"][1:3, 1] = pair_model.tokenizer.pad_token_id
    batch["attention_mask"][1:3, 1] = 0  # rows 1 and 2 have one text only
    calls = []
    handle = pair_model.backbone.register_forward_hook(lambda _m, _i, out: calls.append(out.last_hidden_state.shape[0]))
    try:
        out = pair_model(**batch)
    finally:
        handle.remove()
    assert calls == [6]  # 4 first texts + 2 second texts
    assert out.embeddings[1:3, 1].abs().sum() == 0
    np.testing.assert_allclose(out.embeddings[:, 0].detach().numpy(), pair_model.encode(LEFT), atol=1e-5)


def cosent_reference(cosines, gold, scale):
    terms = [scale * (cosines[j] - cosines[i]) for i in range(len(gold)) for j in range(len(gold)) if gold[i] > gold[j]]
    return torch.logsumexp(torch.stack([torch.tensor(0.0), *terms]), 0)


def test_similarity_losses_match_their_definitions(pair_model):
    batch = pair_batch(pair_model, LEFT, RIGHT)
    gold = torch.tensor([4.0, 3.5, float("nan"), 1.0])  # one pair unlabelled
    out = pair_model(**batch, labels={"sts": gold, "sts_mse": gold})
    cosines = out.logits["sts"].detach()
    keep = [0, 1, 3]
    expected = cosent_reference(cosines[keep], gold[keep], 20.0)
    torch.testing.assert_close(out.task_losses["sts"], expected, atol=1e-5, rtol=1e-5)
    mse = ((cosines[keep] - gold[keep] / 5.0) ** 2).mean()
    torch.testing.assert_close(out.task_losses["sts_mse"], mse, atol=1e-6, rtol=1e-5)


def test_pair_classification_loss_is_cross_entropy_over_labelled_pairs(pair_model):
    out = pair_model(
        **pair_batch(pair_model, LEFT, RIGHT), labels={"paraphrase": torch.tensor([1, 0, IGNORE_INDEX, 1])}
    )
    logits = out.logits["paraphrase"]
    expected = torch.nn.functional.cross_entropy(logits[[0, 1, 3]], torch.tensor([1, 0, 1]))
    torch.testing.assert_close(out.task_losses["paraphrase"], expected)


def contrastive_reference(anchors, candidates, scale, excluded=()):
    anchors = torch.nn.functional.normalize(anchors, dim=-1)
    candidates = torch.nn.functional.normalize(candidates, dim=-1)
    logits = scale * anchors @ candidates.T
    for row, column in excluded:
        logits[row, column] = float("-inf")
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(anchors)))


def test_contrastive_loss_uses_in_batch_and_hard_negatives(pair_model):
    negatives = ["A dog sleeps.", "Rain is expected.", "Bananas are yellow.", "The bus was late."]
    out = pair_model(
        **pair_batch(pair_model, LEFT, RIGHT, negatives), labels={"retrieval": torch.zeros(4, dtype=torch.long)}
    )
    features = out.embeddings.detach()
    candidates = torch.cat([features[:, 1], features[:, 2]])  # every positive, then every hard negative
    torch.testing.assert_close(out.task_losses["retrieval"], contrastive_reference(features[:, 0], candidates, 20.0))
    assert out.logits["retrieval"].shape == (4, 8)


def test_text_fingerprints_tell_texts_apart_and_ignore_padding():
    def fingerprint(rows: list[list[int]], length: int = 12) -> list[int]:
        ids = torch.zeros((len(rows), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for index, row in enumerate(rows):
            ids[index, : len(row)], mask[index, : len(row)] = torch.tensor(row), 1
        return text_fingerprints(ids, mask).tolist()

    text = [101, 2002, 2056, 2008, 2016, 2001, 1999, 1996, 2160, 102]
    assert fingerprint([text], 10) == fingerprint([text], 40)  # equal texts, any padding
    # Changes that keep the token ids' sum and position-weighted sum (which a linear weighting cannot see), swaps,
    # a different length with the same ids, and a 0 id (padding's) inside the text all tell apart.
    shifted = text[:3] + [text[3] + 1, text[4] - 2, text[5] + 1] + text[6:]
    swapped = text[:2] + [text[3], text[2]] + text[4:]
    variants = [text, shifted, swapped, text + [0], text[:-1], [0] + text[1:]]
    assert len(set(fingerprint(variants))) == len(variants)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (20_000,), generator=generator).tolist()
    random_texts = {tuple(torch.randint(0, 30_000, (n,), generator=generator).tolist()) for n in lengths}
    assert len(set(fingerprint([list(t) for t in random_texts]))) == len(random_texts)


@pytest.mark.parametrize(
    "left, right",
    [
        # Rows 0 and 2 share their positive: for each of them the other row's copy is a false negative.
        (LEFT, [RIGHT[0], RIGHT[1], RIGHT[0], RIGHT[3]]),
        # Rows 0 and 2 share their anchor (two positives for one query): each row's positive is the other's too.
        ([LEFT[0], LEFT[1], LEFT[0], LEFT[3]], RIGHT),
    ],
)
def test_contrastive_false_negatives_are_masked_not_pushed_away(pair_model, left, right):
    out = pair_model(**pair_batch(pair_model, left, right), labels={"retrieval": torch.zeros(4, dtype=torch.long)})
    features = out.embeddings.detach()
    expected = contrastive_reference(features[:, 0], features[:, 1], 20.0, excluded=[(0, 2), (2, 0)])
    torch.testing.assert_close(out.task_losses["retrieval"], expected)
    assert not torch.allclose(contrastive_reference(features[:, 0], features[:, 1], 20.0), expected)


def test_contrastive_hard_negatives_of_the_same_anchor_stay_negatives(pair_model):
    left = [LEFT[0], LEFT[1], LEFT[0], LEFT[3]]
    negatives = ["A dog sleeps.", "Rain is expected.", "Bananas are yellow.", "The bus was late."]
    out = pair_model(
        **pair_batch(pair_model, left, RIGHT, negatives), labels={"retrieval": torch.zeros(4, dtype=torch.long)}
    )
    features = out.embeddings.detach()
    candidates = torch.cat([features[:, 1], features[:, 2]])
    # Only the other row's positive is masked; row 2's hard negative (column 6) stays a negative for row 0.
    expected = contrastive_reference(features[:, 0], candidates, 20.0, excluded=[(0, 2), (2, 0)])
    torch.testing.assert_close(out.task_losses["retrieval"], expected)


def test_pair_tasks_in_a_batch_of_single_texts_give_a_zero_that_touches_their_head(pair_model):
    batch = batch_for(pair_model, LEFT)
    labels = {
        "topic": torch.tensor([0, 1, 2, 0]),
        "sts": torch.full((4,), float("nan")),
        "paraphrase": torch.full((4,), IGNORE_INDEX),
        "retrieval": torch.full((4,), IGNORE_INDEX),
    }
    pair_model.zero_grad()
    out = pair_model(**batch, labels=labels)
    assert set(out.logits) == {"topic"}  # no second text: pair tasks have nothing to score
    assert all(float(out.task_losses[name].detach()) == 0.0 for name in ("sts", "paraphrase", "retrieval"))
    out.loss.backward()
    assert all(p.grad is not None for p in pair_model.heads["paraphrase"].parameters())
    pair_model.zero_grad()


def test_pair_labels_are_checked(pair_model):
    batch = pair_batch(pair_model, LEFT, RIGHT)
    with pytest.raises(ValueError, match=r"task 'paraphrase': label id 2 is out of range"):
        pair_model(**batch, labels={"paraphrase": torch.tensor([0, 1, 2, 0])})
    with pytest.raises(ValueError, match=r"task 'paraphrase': labels must be integer ids"):
        pair_model(**batch, labels={"paraphrase": torch.tensor([0.0, 1.0, 1.0, 0.0])})
    with pytest.raises(ValueError, match=r"task 'sts': labels have shape \(3,\), expected \(4,\)"):
        pair_model(**batch, labels={"sts": torch.tensor([1.0, 2.0, 3.0])})
    # Gold scores outside the task's declared score_range [0, 5], or not finite, are refused (NaN: missing).
    for bad in (7.0, -0.5, float("inf")):
        with pytest.raises(ValueError, match=r"task 'sts': gold scores must be finite and within its score_range"):
            pair_model(**batch, labels={"sts": torch.tensor([1.0, float("nan"), bad, 0.0])})
    # Labels of a pair task on a batch of single texts have nothing to score: an error, not a silent zero.
    with pytest.raises(ValueError, match=r"task 'sts': labels were given for a batch of single texts"):
        pair_model(**batch_for(pair_model, LEFT), labels={"sts": torch.tensor([1.0, 2.0, 3.0, 4.0])})


def test_embed_gives_the_embeddings_without_heads(pair_model):
    batch = pair_batch(pair_model, LEFT, RIGHT)
    with torch.no_grad():
        torch.testing.assert_close(pair_model.embed(**batch), pair_model(**batch).embeddings)
        single = batch_for(pair_model, LEFT)
        np.testing.assert_allclose(pair_model.embed(**single).numpy(), pair_model.encode(LEFT), atol=1e-5)


# ---------------------------------------------------------------- transformers conventions


def test_standard_pipelines_serve_a_chosen_task(model, tmp_path):
    from transformers import pipeline

    model.save_pretrained(tmp_path)
    text = "John Smith works for Acme Corporation in New York."
    classify = pipeline("text-classification", model=str(tmp_path), trust_remote_code=True, top_k=None)
    scores = {row["label"]: row["score"] for row in classify(text)[0]}
    assert scores == pytest.approx(model.predict(text, tasks=["topic"])["topic"]["scores"], abs=1e-5)  # first task
    chosen = pipeline("text-classification", model=str(tmp_path), trust_remote_code=True, top_k=None,
                      model_kwargs={"pipeline_task": "tags"})  # fmt: skip
    assert {row["label"] for row in chosen(text)[0]} == {"a", "b", "c"}
    # `predict` reads a word's tag from its first sub-token (as training does): the pipeline's "first" aggregation
    tagger = pipeline("token-classification", model=str(tmp_path), trust_remote_code=True, aggregation_strategy="first")
    found = 0
    for sentence in [text, *SENTENCES]:
        expected = [
            (e["entity"], e["start"], e["end"]) for e in model.predict(sentence, tasks=["ner"])["ner"]["entities"]
        ]
        assert [(e["entity_group"], e["start"], e["end"]) for e in tagger(sentence)] == expected
        found += len(expected)
    assert found  # entities were compared, not two empty lists
    features = pipeline("feature-extraction", model=str(tmp_path), trust_remote_code=True)
    np.testing.assert_allclose(np.asarray(features(text))[0], model.encode(text), atol=1e-5)  # the sentence embedding
    with pytest.raises(ValueError, match="pipeline_task='ner' is not one"):
        pipeline(
            "text-classification", model=str(tmp_path), trust_remote_code=True, model_kwargs={"pipeline_task": "ner"}
        )


def test_resize_token_embeddings_for_new_domain_tokens(tiny_bert, tmp_path):
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:1])
    size = len(model.tokenizer)
    model.tokenizer.add_tokens(["zyxdomainterm"])
    model.resize_token_embeddings(len(model.tokenizer))
    assert model.get_input_embeddings().num_embeddings == size + 1
    model.save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path)
    assert loaded.config.backbone_config.vocab_size == size + 1
    np.testing.assert_allclose(loaded.encode("a zyxdomainterm here"), model.encode("a zyxdomainterm here"), atol=1e-6)


def test_compile_encoder_runs_encode_through_the_compiled_graph(tiny_bert):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS[:1]).eval()
    expected = model.encode(SENTENCES)
    torch._dynamo.reset()
    counters.clear()
    model.compile_encoder(backend="eager")  # the compile path without a C++ toolchain; inductor is the default
    np.testing.assert_allclose(model.encode(SENTENCES), expected, atol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 1


def test_heads_with_their_own_view_of_the_tokens(tiny_bert):
    tasks = [
        {"name": "topic", "labels": ["a", "b"], "head": {"type": "transformer", "pooling": "attention"}},
        {"name": "sentiment", "labels": ["neg", "pos"], "head": {"pooling": "attention"}},
        {"name": "ner", "type": "token_classification", "labels": ["O", "B", "I"], "head": "transformer"},
    ]
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=tasks).eval()
    assert model.heads["topic"].adapter is not None and model.heads["sentiment"].adapter is None
    batch = batch_for(model, SENTENCES)
    out = model(**batch)
    # The shared embedding is untouched by the heads' own pooling; each head reads its own view.
    np.testing.assert_allclose(out.embeddings.detach().numpy(), model.encode(SENTENCES), atol=1e-5)
    with torch.no_grad():
        head = model.heads["sentiment"]
        expected = head(head.pooling(out.last_hidden_state, batch["attention_mask"]))
        torch.testing.assert_close(out.logits["sentiment"], expected)
    # Padding never changes a prediction (the adapters mask padded tokens).
    alone = [model.predict(text) for text in SENTENCES]
    for got, want in zip(model.predict(SENTENCES), alone):
        assert got["topic"]["scores"] == pytest.approx(want["topic"]["scores"], abs=1e-5)
        assert [w["tag"] for w in got["ner"]["words"]] == [w["tag"] for w in want["ner"]["words"]]
    with pytest.raises(ValueError, match="a transformer head, or one with layers of its own, reads token states"):
        MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "t", "labels": ["a", "b"], "head": "transformer"}])


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "modernbert"])
def test_heads_with_their_own_top_layers(tiny_backbones, family, tmp_path):
    tasks = [
        {"name": "ner", "type": "token_classification", "labels": ["O", "B", "I"], "head": {"layers": 1}},
        {"name": "topic", "labels": ["a", "b"], "head": {"layers": 2, "pooling": "attention"}},
    ]
    torch.manual_seed(0)
    model = MultiTaskModel.from_backbone(tiny_backbones[family], tasks=tasks).eval()
    batch = batch_for(model, SENTENCES)
    out = model(**batch)
    # The own layers start as copies of the pretrained top layers: at first they give the shared token states.
    torch.testing.assert_close(out.logits["ner"], model.heads["ner"](out.last_hidden_state), atol=1e-5, rtol=1e-4)
    model.train()
    labels = {"ner": torch.zeros_like(batch["input_ids"]), "topic": torch.tensor([0, 1, 0])}
    model(**batch, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.heads["ner"].branch.parameters())
    model.eval()
    with torch.no_grad():  # once trained they differ, and survive save / load
        for parameter in model.heads["ner"].branch.parameters():
            parameter.add_(0.05)
    model.save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**batch).logits["ner"], model(**batch).logits["ner"])
    # Pairs in the batch: the branch runs on each row's first text only.
    pairs = model.tokenize(SENTENCES[:2] + SENTENCES[1:], return_token_type_ids=False)
    grouped = {key: value.view(2, 2, -1).transpose(0, 1) for key, value in pairs.items()}
    alone = model(**model.tokenize(SENTENCES[:2], return_token_type_ids=False))
    torch.testing.assert_close(model(**grouped).logits["topic"], alone.logits["topic"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="head layers=9 exceeds the backbone's 2 layers"):
        MultiTaskModel.from_backbone(tiny_backbones[family], tasks=[{**tasks[0], "head": {"layers": 9}}])


# ---------------------------------------------------------------- what the caller gives: one clear error


def forward_with(model, **changes):
    batch = dict(batch_for(model, SENTENCES))
    return model(**{**batch, **changes})


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"input_ids": [[1, 2, 3]]}, TypeError, "input_ids must be a torch tensor"),
        ({"input_ids": torch.ones(3, 5)}, TypeError, "input_ids must hold integer token ids, got torch.float32"),
        ({"input_ids": torch.full((3, 5), 10**6)}, ValueError, "input_ids holds the token id 1000000: the encoder's"),
        ({"input_ids": torch.full((3, 5), -1)}, ValueError, "input_ids holds the token id -1"),
        (
            {"input_ids": torch.ones(3, 2, 2, 5, dtype=torch.long)},
            ValueError,
            r"input_ids must have shape \(batch, seq\)",
        ),
        ({"input_ids": torch.ones(1, 300, dtype=torch.long)}, ValueError, "300 tokens per text; the backbone encodes"),
        ({"attention_mask": torch.ones(3, 2)}, ValueError, r"attention_mask has shape \(3, 2\), input_ids \(3, \d+\)"),
        ({"attention_mask": [[1]]}, TypeError, "attention_mask must be a torch tensor"),
        ({"head_gradient_scale": "x"}, ValueError, "head_gradient_scale must be a finite number in"),
        ({"head_gradient_scale": 2.0}, ValueError, r"head_gradient_scale must be a finite number in \[0, 1\]"),
        ({"tasks": 5}, TypeError, "tasks must be a task name or a list of task names, got int"),
    ],
)
def test_bad_forward_inputs_are_one_clear_error(model, changes, error, message):
    if "attention_mask" not in changes and "input_ids" in changes:
        changes["attention_mask"] = None  # the batch's own mask would not fit the ids given
    with pytest.raises(error, match=message):
        forward_with(model, **changes)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_class_ids_of_any_width_are_read_as_int64(model, dtype):
    batch = batch_for(model, SENTENCES)
    ids = torch.tensor([0, 2, 1])
    expected = model(**batch, labels={"topic": ids}).task_losses["topic"]
    torch.testing.assert_close(model(**batch, labels={"topic": ids.to(dtype)}).task_losses["topic"], expected)


@pytest.mark.parametrize(
    "targets",
    [
        torch.tensor([1.0, float("inf"), 0.0]),
        torch.tensor([1.0, -float("inf"), 0.0]),
        torch.tensor([1.0, 1e39, 0.0], dtype=torch.float64),  # finite in float64, inf in float32
    ],
)
def test_regression_targets_must_be_finite_float32_numbers(model, targets):
    batch = batch_for(model, SENTENCES)
    with pytest.raises(ValueError, match=r"task 'score': targets must be finite float32 numbers \(NaN for missing\)"):
        model(**batch, labels={"score": targets})
    loss = model(**batch, labels={"score": torch.tensor([1.0, float("nan"), 3.0])}).loss  # NaN: missing
    assert torch.isfinite(loss)


def test_exporting_the_embedding_over_a_saved_model_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="saved holds a multi-task model: exporting the embedding there would replace"):
        model.export_sentence_transformers(tmp_path / "saved")
    assert MultiTaskModel.from_pretrained(tmp_path / "saved").task_names == model.task_names  # still whole
    model.export_sentence_transformers(tmp_path / "st")
    with pytest.raises(ValueError, match="st holds a model's weights: exporting the embedding there would replace"):
        model.export_sentence_transformers(tmp_path / "st")


@pytest.mark.parametrize(
    "tasks, error, message",
    [
        ("x", ValueError, "tasks must be a list of task dicts, got str"),
        (None, ValueError, "tasks must be a list of task dicts, got NoneType"),
        ([{"labels": ["a", "b"]}], ValueError, "task name must be a non-empty string"),
        (["topic2"], ValueError, "each task must be a dict, got str"),
    ],
)
def test_add_tasks_checks_its_argument(model, tasks, error, message):
    with pytest.raises(error, match=message):
        model.add_tasks(tasks)


def make_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


@pytest.mark.parametrize(
    "source, error, message",
    [
        (lambda tmp_path, bert: "/no/such/folder", MissingFileError, "name_or_path: no such folder /no/such/folder"),
        (lambda tmp_path, bert: "./no-such", MissingFileError, "no such folder ./no-such"),
        (lambda tmp_path, bert: tmp_path / "missing", MissingFileError, "no such folder"),
        (lambda tmp_path, bert: str(bert / "config.json"), FileError, "config.json is a file, not a model folder"),
        (lambda tmp_path, bert: "", InputError, "name_or_path is empty"),
        (lambda tmp_path, bert: None, InputTypeError, "name_or_path must be a folder path or a Hub model id"),
        (lambda tmp_path, bert: 42, InputTypeError, "got int: 42"),
        (lambda tmp_path, bert: make_empty_folder(tmp_path), MissingFileError, "empty holds no config.json"),
    ],
)
def test_from_backbone_names_a_source_that_is_not_there(tiny_bert, tmp_path, source, error, message):
    with pytest.raises(error, match=message):
        MultiTaskModel.from_backbone(source(tmp_path, tiny_bert), tasks=TASKS)


def test_a_hub_id_still_goes_to_the_hub(monkeypatch):
    # A name that can be a repo id is asked of the Hub (offline in the tests: its error, not "no such folder").
    with pytest.raises(OSError) as error:
        MultiTaskModel.from_backbone("no-such-org/no-such-model")
    assert not isinstance(error.value, MissingFileError)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"projection_dim": 10**10}, InputError, "projection_dim must be an int from 1 to 65536, got 10000000000"),
        ({"dtype": "fp42"}, InputError, r"dtype must be 'auto', one of \['float32', 'float16', 'bfloat16'"),
        ({"dtype": torch.int8}, InputError, "dtype must be 'auto'"),
        ({"tokenizer": "bert"}, InputTypeError, r"tokenizer must be a tokenizer object \(or None\), got str"),
        ({"tokenizer": 3}, InputTypeError, "tokenizer must be a tokenizer object"),
    ],
)
def test_from_backbone_checks_its_options(tiny_bert, kwargs, error, message):
    with pytest.raises(error, match=message):
        MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS, **kwargs)


def test_a_save_leaves_another_process_s_save_in_progress_alone(model, tmp_path):
    model.save_pretrained(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f".staging-{os.getppid()}"  # a save of a running process (the one that started the tests)
    stale = tmp_path / f".staging-{dead.pid}"  # a save whose process is gone
    old = tmp_path / ".staging-1"  # a running pid, but a day old: no save takes that long
    for folder in (live, stale, old):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    os.utime(old, (os.path.getmtime(old) - 24 * 3600,) * 2)
    model.save_pretrained(tmp_path)
    assert live.is_dir() and (live / "model.safetensors").read_bytes() == b"partial"
    assert not stale.exists() and not old.exists()
    assert MultiTaskModel.from_pretrained(tmp_path).task_names == model.task_names
