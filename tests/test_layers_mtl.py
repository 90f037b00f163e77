"""A head's own top layers are plain modules run on the hidden states entering the shared top layers, with the
arguments each encoder family gives its layers written out (`layers_mtl.LAYER_ARGUMENTS`): checked here by running
a backbone's *own* top layers that way, which must give its output exactly, for every family and depth. A change of a
layer's call signature upstream fails these tests (and a family whose layers need unknown arguments is refused when
the head is built), never silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    DebertaV2Config,
    ElectraConfig,
    MegatronBertConfig,
    MPNetConfig,
    RobertaPreLayerNormConfig,
    XLMRobertaConfig,
    XLMRobertaXLConfig,
)

from layers_mtl import TaskHead, TopLayers, backbone_layers, final_norm, run_layers
from modeling_mtl import MultiTaskModel
from validation_mtl import InputError

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37}
CONFIGS = {
    "mpnet": lambda: MPNetConfig(vocab_size=100, **TINY),
    "deberta-v2": lambda: DebertaV2Config(vocab_size=100, relative_attention=True, position_buckets=8, **TINY),
    "electra": lambda: ElectraConfig(vocab_size=100, embedding_size=32, **TINY),
    "xlm-roberta": lambda: XLMRobertaConfig(vocab_size=100, max_position_embeddings=66, **TINY),
    # pre-LayerNorm families: their norm after the last layer lives at a different path in each (FINAL_NORMS)
    "megatron-bert": lambda: MegatronBertConfig(vocab_size=100, **TINY),
    "xlm-roberta-xl": lambda: XLMRobertaXLConfig(vocab_size=100, max_position_embeddings=66, **TINY),
    "roberta-prelayernorm": lambda: RobertaPreLayerNormConfig(vocab_size=100, max_position_embeddings=66, **TINY),
}


def backbones(tiny_backbones):
    for family, folder in tiny_backbones.items():
        yield family, AutoModel.from_pretrained(folder)
    for family, make in CONFIGS.items():
        torch.manual_seed(0)
        yield family, AutoModel.from_config(make())


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padded rows: every mask-dependent step is exercised
    mask[2, 3:] = 0
    return ids, mask


def test_running_a_backbones_own_top_layers_explicitly_gives_its_output(tiny_backbones):
    checked = []
    for family, backbone in backbones(tiny_backbones):
        backbone.eval()
        ids, mask = padded_batch(backbone.config.vocab_size)
        with torch.no_grad():
            out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            layers = backbone_layers(backbone)
            for depth in range(1, len(layers) + 1):
                states = run_layers(layers[-depth:], out.hidden_states[-depth - 1], mask, backbone)
                norm = final_norm(backbone)
                states = norm(states) if norm is not None else states
                real = mask.bool()  # what padded positions hold is never read
                torch.testing.assert_close(
                    states[real], out.last_hidden_state[real], atol=1e-5, rtol=1e-5, msg=f"{family}, depth {depth}"
                )
        checked.append(family)
    assert checked == ["bert", "distilbert", "roberta", "modernbert", *CONFIGS]


def test_a_family_whose_layers_take_unknown_arguments_is_refused_when_the_head_is_built():
    class Layer(nn.Module):
        def forward(self, hidden_states, attention_mask=None, rotary_cache=None):
            return hidden_states

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "mystery", "num_hidden_layers": 2})()
            self.layers = nn.ModuleList([Layer(), Layer()])

    with pytest.raises(InputError, match=r"'mystery' encoder: its layers also take \['rotary_cache'\]"):
        TopLayers(Backbone(), 1)
    head = {"type": "linear", "dropout": 0.1, "pooling": "attention"}
    assert TaskHead(32, 2, head).branch is None  # heads without layers of their own never ask


def test_a_family_whose_copied_layers_would_not_give_its_output_is_refused_when_the_head_is_built(monkeypatch):
    import layers_mtl

    backbone = AutoModel.from_config(MegatronBertConfig(vocab_size=100, **TINY))
    TopLayers(backbone, 1)  # with its final norm known, the copies give the backbone's output
    monkeypatch.setitem(layers_mtl.FINAL_NORMS, "megatron-bert", "no_such_norm")  # as if the norm were unknown
    with pytest.raises(InputError, match=r"top 1 layer\(s\) of a 'megatron-bert' encoder on their own does not give"):
        TopLayers(backbone, 1)


def test_an_encoder_whose_layers_are_shared_is_refused_for_heads_with_layers():
    from transformers import AlbertConfig

    albert = AutoModel.from_config(AlbertConfig(vocab_size=100, embedding_size=16, **TINY))
    with pytest.raises(InputError, match=r"cannot find the 3 transformer layers of a AlbertModel"):
        TopLayers(albert, 1)


def test_the_copies_share_the_backbones_config_and_follow_its_attention_implementation(tiny_bert):
    model = MultiTaskModel.from_backbone(
        tiny_bert, tasks=[{"name": "t", "labels": ["a", "b"], "head": {"pooling": "attention", "layers": 1}}]
    ).eval()
    branch = model.heads["t"].branch
    attention = branch.layers[0].attention.self
    assert attention.config is model.backbone.config
    batch = model.tokenize(["A short one.", "A longer sentence with more words in it."], return_token_type_ids=False)
    with torch.no_grad():
        before = model(**batch).logits["t"]
        model.backbone.set_attn_implementation("eager")
        assert attention.config._attn_implementation == "eager"
        torch.testing.assert_close(model(**batch).logits["t"], before, atol=1e-5, rtol=1e-5)


def test_from_backbone_loads_the_encoder_once_and_the_copies_start_as_its_top_layers(tiny_bert, monkeypatch):
    """The pretrained encoder goes into the model as it is (no random encoder built first and swapped out), and a
    head's own layers start as copies of its pretrained top layers, in the model's first forward pass equal to
    them."""
    built = []
    original = AutoModel.from_config
    monkeypatch.setattr(AutoModel, "from_config", lambda *a, **k: built.append(1) or original(*a, **k))
    model = MultiTaskModel.from_backbone(
        tiny_bert, tasks=[{"name": "ner", "type": "token_classification", "labels": ["O", "B"], "head": {"layers": 2}}]
    ).eval()
    assert built == []
    pretrained = AutoModel.from_pretrained(tiny_bert)
    for name, value in pretrained.state_dict().items():
        if not name.startswith("pooler."):
            torch.testing.assert_close(model.backbone.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for mine, theirs in zip(model.heads["ner"].branch.layers, backbone_layers(model.backbone)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_head_added_to_a_trained_model_copies_its_trained_top_layers(tiny_bert):
    model = MultiTaskModel.from_backbone(tiny_bert, tasks=[{"name": "a", "labels": ["x", "y"]}])
    with torch.no_grad():
        for parameter in model.backbone.parameters():  # "trained": away from the pretrained weights
            parameter.add_(0.01)
    extended = model.add_tasks(
        [{"name": "ner", "type": "token_classification", "labels": ["O", "B"], "head": {"layers": 1}}]
    )
    copy, top = extended.heads["ner"].branch.layers[0], backbone_layers(model.backbone)[-1]
    for (name, a), (_, b) in zip(copy.state_dict().items(), top.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
