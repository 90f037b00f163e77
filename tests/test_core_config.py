"""MultiTaskConfig: validation with clear errors, and exact round trips."""

import json

import pytest
from transformers import AutoConfig, BertConfig, DistilBertConfig

from configuration_mtl import POOLING_MODES, MultiTaskConfig

TINY = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 100,
}
TASKS = [
    {"name": "topic", "labels": ["sports", "politics", "science"], "head": {"type": "mlp", "hidden_size": 16}},
    {"name": "tags", "type": "multi_label_classification", "labels": ["a", "b", "c"], "threshold": 0.4},
    {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER"], "loss_weight": 0.5},
    {"name": "score", "type": "regression"},
]


def make_config(**overrides):
    kwargs = {"backbone_config": dict(TINY), "tasks": TASKS}
    kwargs.update(overrides)
    return MultiTaskConfig(**kwargs)


def test_defaults_are_filled_in_and_views_agree():
    config = make_config(projection_dim=8, normalize=True, pooling="max")
    assert isinstance(config.backbone_config, BertConfig)
    assert config.task_names == ["topic", "tags", "ner", "score"]
    topic = config.get_task("topic")
    assert topic["type"] == "classification" and topic["loss_weight"] == 1.0
    assert topic["head"] == {"type": "mlp", "dropout": 0.1, "hidden_size": 16, "activation": "gelu"}
    assert config.get_task("tags")["threshold"] == 0.4
    assert config.get_task("score")["labels"] == ["score"]
    assert config.task_id2label("ner") == {0: "O", 1: "B-PER", 2: "I-PER"}
    assert config.task_label2id("topic") == {"sports": 0, "politics": 1, "science": 2}
    assert config.embedding_dim == 8 and config.hidden_size == 32


def test_default_backbone_config_has_minilm_shape():
    config = MultiTaskConfig()
    assert config.backbone_config.model_type == "bert"
    assert (config.backbone_config.hidden_size, config.backbone_config.num_hidden_layers) == (384, 6)
    assert config.tasks == [] and config.pooling == "mean"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pooling": "median"}, "pooling 'median' is not one of"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"]}, {"name": "a", "labels": ["x", "y"]}]}, "duplicate task names"),
        ({"tasks": [{"name": "a", "labels": ["only"]}]}, "needs at least 2 labels"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "loss_weight": -1}]}, "loss_weight must be a number >= 0"),
        ({"tasks": [{"name": "a", "type": "ranking", "labels": ["x", "y"]}]}, "type 'ranking' is not one of"),
        ({"tasks": [{"name": "a.b", "labels": ["x", "y"]}]}, "task name must be"),
        ({"tasks": [{"name": "a", "labels": ["x", "x"]}]}, "duplicate labels ['x']"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "head": {"type": "cnn"}}]}, "head type 'cnn' is not one of"),
        (
            {"tasks": [{"name": "a", "labels": ["x", "y"], "head": {"type": "mlp", "activation": "nope"}}]},
            "head activation 'nope' is unknown",
        ),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "colour": 1}]}, "unknown keys ['colour']"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "threshold": 0.3}]}, "threshold only applies"),
        ({"tasks": [{"name": "a", "labels": "xy"}]}, "`labels` must be a list"),
        ({"projection_dim": 0}, "projection_dim must be a positive int"),
        ({"max_seq_length": 100000}, "exceeds the backbone's max_position_embeddings"),
        ({"backbone_config": {"hidden_size": 8}}, "needs a 'model_type' key"),
        ({"head_dropout": 1.5}, "head_dropout must be a number in [0, 1)"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        make_config(**overrides)
    assert message in str(error.value)


def test_round_trip_through_dict_and_disk(tmp_path):
    config = make_config(
        projection_dim=16, projection_activation="tanh", normalize=True, pooling="attention", max_seq_length=64
    )
    rebuilt = MultiTaskConfig.from_dict(config.to_dict())
    assert rebuilt.to_dict() == config.to_dict()

    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "multitask_sentence_transformer"
    assert on_disk["backbone_config"]["model_type"] == "bert"
    assert on_disk["tasks"][2]["labels"] == ["O", "B-PER", "I-PER"]
    loaded = MultiTaskConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.backbone_config, BertConfig)
    # The Auto class resolves the registered model type once modeling_mtl has been imported.
    import modeling_mtl  # noqa: F401

    assert type(AutoConfig.from_pretrained(tmp_path)) is MultiTaskConfig


def test_other_backbone_families_nest():
    config = MultiTaskConfig(
        backbone_config={"model_type": "distilbert", "dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 37},
        tasks=[{"name": "a", "labels": ["x", "y"]}],
    )
    assert isinstance(config.backbone_config, DistilBertConfig)
    assert config.hidden_size == 32
    assert MultiTaskConfig.from_dict(config.to_dict()).backbone_config.dim == 32


def test_every_pooling_mode_is_accepted():
    for mode in POOLING_MODES:
        assert make_config(pooling=mode).pooling == mode
