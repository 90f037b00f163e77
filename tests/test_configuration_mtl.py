"""configuration_mtl: task validation with clear errors (every task type), and exact round trips."""

import json

import pytest
from transformers import AutoConfig, BertConfig, DistilBertConfig

from configuration_mtl import MultiTaskConfig, normalize_task

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
    {"name": "sts", "type": "similarity", "score_range": [0, 5]},
    {"name": "paraphrase", "type": "pair_classification", "labels": ["no", "yes"], "pair_features": ["u", "v"]},
    {"name": "retrieval", "type": "contrastive", "scale": 10, "gather_across_processes": True},
]


def make_config(**overrides):
    kwargs = {"backbone_config": dict(TINY), "tasks": TASKS}
    kwargs.update(overrides)
    return MultiTaskConfig(**kwargs)


def test_defaults_are_filled_in_and_views_agree():
    config = make_config(projection_dim=8, normalize=True, pooling="max")
    assert isinstance(config.backbone_config, BertConfig)
    assert config.task_names == ["topic", "tags", "ner", "score", "sts", "paraphrase", "retrieval"]
    topic = config.get_task("topic")
    assert topic["type"] == "classification" and topic["loss_weight"] == 1.0
    assert topic["head"] == {"type": "mlp", "dropout": 0.1, "hidden_size": 16, "activation": "gelu"}
    assert config.get_task("tags")["threshold"] == 0.4
    assert config.get_task("score")["labels"] == ["score"]
    assert config.task_id2label("ner") == {0: "O", 1: "B-PER", 2: "I-PER"}
    assert config.task_label2id("topic") == {"sports": 0, "politics": 1, "science": 2}
    assert config.embedding_dim == 8 and config.hidden_size == 32
    sts = config.get_task("sts")
    assert (sts["loss"], sts["score_range"], sts["scale"], sts["labels"]) == ("cosent", [0.0, 5.0], 20.0, [])
    assert "head" not in sts
    assert config.get_task("paraphrase")["pair_features"] == ["u", "v"]
    retrieval = config.get_task("retrieval")
    assert (retrieval["scale"], retrieval["gather_across_processes"]) == (10.0, True)
    assert normalize_task({"name": "p", "type": "pair_classification", "labels": ["a", "b"]})["pair_features"] == [
        "u",
        "v",
        "|u-v|",
    ]


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
        (
            {"tasks": [{"name": "a", "labels": ["x", "y"], "loss_weight": -1}]},
            "loss_weight must be a finite number >= 0",
        ),
        ({"tasks": [{"name": "a", "type": "ranking", "labels": ["x", "y"]}]}, "type 'ranking' is not one of"),
        ({"tasks": [{"name": "a.b", "labels": ["x", "y"]}]}, "task name must be"),
        ({"tasks": [{"name": "a", "labels": ["x", "x"]}]}, "duplicate labels ['x']"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "head": {"type": "cnn"}}]}, "head type 'cnn' is not one of"),
        (
            {"tasks": [{"name": "a", "labels": ["x", "y"], "head": {"type": "mlp", "activation": "nope"}}]},
            "head activation 'nope' is unknown",
        ),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "colour": 1}]}, "unknown keys ['colour']"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "threshold": 0.3}]}, "unknown keys ['threshold'] for a class"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "loss_weight": float("nan")}]}, "loss_weight must be a finite"),
        ({"tasks": [{"name": "a", "labels": ["x", "y"], "loss_weight": True}]}, "loss_weight must be a finite"),
        ({"tasks": [{"name": "training", "labels": ["x", "y"]}]}, "task name 'training' is reserved"),
        ({"tasks": [{"name": "embedding", "labels": ["x", "y"]}]}, "task name 'embedding' is reserved"),
        # every attribute of the heads' nn.ModuleDict, not a hand-written few (these were a KeyError from torch)
        ({"tasks": [{"name": "cpu", "labels": ["x", "y"]}]}, "task name 'cpu' is reserved"),
        ({"tasks": [{"name": "keys", "labels": ["x", "y"]}]}, "task name 'keys' is reserved"),
        ({"tasks": [{"name": "half", "labels": ["x", "y"]}]}, "task name 'half' is reserved"),
        ({"tasks": [{"name": "_modules", "labels": ["x", "y"]}]}, "task name '_modules' is reserved"),
        ({"tasks": [{"name": "s", "type": "similarity", "loss": "triplet"}]}, "loss 'triplet' is not one of"),
        ({"tasks": [{"name": "s", "type": "similarity", "score_range": [5, 0]}]}, "score_range must be [low, high]"),
        ({"tasks": [{"name": "s", "type": "similarity", "score_range": [0, "5"]}]}, "score_range must be [low, high]"),
        ({"tasks": [{"name": "s", "type": "similarity", "labels": ["x", "y"]}]}, "has no label names"),
        ({"tasks": [{"name": "s", "type": "similarity", "head": "mlp"}]}, "has no head"),
        ({"tasks": [{"name": "c", "type": "contrastive", "scale": 0}]}, "scale must be a number > 0"),
        ({"tasks": [{"name": "c", "type": "contrastive", "gather_across_processes": "yes"}]}, "must be true or false"),
        ({"tasks": [{"name": "c", "type": "contrastive", "pair_features": ["u"]}]}, "unknown keys ['pair_features']"),
        (
            {"tasks": [{"name": "p", "type": "pair_classification", "labels": ["a", "b"], "pair_features": ["u*u"]}]},
            "pair_features must be a non-empty list",
        ),
        (
            {"tasks": [{"name": "p", "type": "pair_classification", "labels": ["a", "b"], "pair_features": []}]},
            "pair_features must be a non-empty list",
        ),
        *(
            (
                {"tasks": [{"name": "p", "type": "pair_classification", "labels": ["a", "b"], "head": head}]},
                "a pair_classification head reads the two sentence embeddings",
            )
            for head in ({"pooling": "attention"}, {"pooling": "attention", "layers": 1}, "transformer")
        ),
        ({"tasks": [{"name": "a", "labels": "xy"}]}, "`labels` must be a list"),
        ({"projection_dim": 0}, "projection_dim must be an int from 1 to 65536"),
        # a typo that would otherwise ask torch's allocator for a hidden_size x 10**10 matrix
        ({"projection_dim": 10**10}, "projection_dim must be an int from 1 to 65536, got 10000000000"),
        ({"tasks": "x"}, "tasks must be a list of task dicts, got str"),
        ({"max_seq_length": 100000}, "exceeds the 512 token positions the backbone can encode"),
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


def test_pair_tasks_round_trip_and_build_their_heads(tmp_path):
    import modeling_mtl

    config = make_config(projection_dim=8)
    config.save_pretrained(tmp_path)
    loaded = MultiTaskConfig.from_pretrained(tmp_path)
    assert loaded.tasks == config.tasks
    model = modeling_mtl.MultiTaskModel(loaded)
    # Headless tasks score the embedding itself; the pair head reads len(pair_features) * embedding_dim inputs.
    assert set(model.heads) == {"topic", "tags", "ner", "score", "paraphrase"}
    assert model.heads["paraphrase"].out_proj.in_features == 2 * 8
