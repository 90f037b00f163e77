"""A model that loads is whole: a folder whose weights miss a tensor the config has (a head, a layer, a task added to
the config after training), hold one of another shape, hold NaN or infinite values, or come without a tokenizer's
vocabulary is refused with one error naming the file and the tensor, by `from_pretrained` and by `AutoModel` alike
(transformers itself would warn and initialise the tensor afresh). Adding a head on purpose has its own switch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from modeling_mtl import MultiTaskModel
from validation_mtl import FileError, InputError, InputTypeError, MissingFileError

TASKS = [
    {"name": "topic", "labels": ["a", "b", "c"]},
    {"name": "ner", "type": "token_classification", "labels": ["O", "B", "I"], "head": {"layers": 1}},
]


@pytest.fixture(scope="module")
def saved(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole") / "model"
    torch.manual_seed(0)
    MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS).save_pretrained(folder)
    return folder


def copy_with(saved, tmp_path, weights=None, config=None):
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    if weights is not None:
        tensors = weights(load_file(folder / "model.safetensors"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        document = json.loads((folder / "config.json").read_text())
        config(document)
        (folder / "config.json").write_text(json.dumps(document))
    return folder


def without(prefix):
    return lambda tensors: {name: value for name, value in tensors.items() if not name.startswith(prefix)}


def test_a_whole_model_loads(saved):
    model = MultiTaskModel.from_pretrained(saved)
    loaded, info = MultiTaskModel.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert model.predict("John lives in Paris.")["topic"]["label"] in ("a", "b", "c")


def test_a_missing_head_is_refused_unless_asked_for(saved, tmp_path):
    folder = copy_with(saved, tmp_path, weights=without("heads.topic."))
    with pytest.raises(FileError, match=r"the weights do not match the config \(no tensor for heads\.topic\.out_proj"):
        MultiTaskModel.from_pretrained(folder)
    model = MultiTaskModel.from_pretrained(folder, allow_missing_weights=True)  # a fresh head, on purpose
    assert model.heads["topic"].out_proj.weight.shape == (3, 32)


def test_a_missing_encoder_layer_is_refused(saved, tmp_path):
    folder = copy_with(saved, tmp_path, weights=without("backbone.encoder.layer.1."))
    with pytest.raises(FileError, match=r"no tensor for backbone\.encoder\.layer\.1\.attention"):
        MultiTaskModel.from_pretrained(folder)


def test_a_task_added_to_the_config_after_training_is_refused(saved, tmp_path):
    folder = copy_with(saved, tmp_path, config=lambda c: c["tasks"].append({"name": "mood", "labels": ["x", "y"]}))
    with pytest.raises(FileError, match=r"no tensor for heads\.mood\.out_proj\.bias.*model\.add_tasks"):
        MultiTaskModel.from_pretrained(folder)


def test_a_head_of_another_shape_is_refused(saved, tmp_path):
    folder = copy_with(saved, tmp_path, config=lambda c: c["tasks"][0]["labels"].append("d"))
    with pytest.raises(FileError, match=r"tensors of another shape: heads\.topic\.out_proj\.bias \(file \(3,\), model"):
        MultiTaskModel.from_pretrained(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(saved, tmp_path, value):
    def poison(tensors):
        name = "backbone.embeddings.position_embeddings.weight"  # positions past a short probe sentence
        tensors[name][40, 3] = value
        return tensors

    folder = copy_with(saved, tmp_path, weights=poison)
    message = r"weight backbone\.embeddings\.position_embeddings\.weight holds 1 NaN or infinite value"
    with pytest.raises(FileError, match=message):
        MultiTaskModel.from_pretrained(folder)
    with pytest.raises(FileError, match=message):  # AutoModel passes its own config: the checks still run
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def test_a_tokenizer_config_without_a_vocabulary_is_refused(saved, tmp_path):
    folder = copy_with(saved, tmp_path)
    (folder / "tokenizer.json").unlink()
    assert (folder / "tokenizer_config.json").is_file()
    with pytest.raises(FileError, match="holds no tokenizer files"):
        MultiTaskModel.from_pretrained(folder)


@pytest.mark.parametrize(
    "header",
    [b'{"a": 1}', b'{"a": {"dtype": "F32"}}', b'{"a": {"data_offsets": "x"}}', b"[1, 2]"],
)
def test_a_malformed_safetensors_header_is_one_error(saved, tmp_path, header):
    folder = copy_with(saved, tmp_path)
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(FileError, match="has a damaged header"):
        MultiTaskModel.from_pretrained(folder)


@pytest.mark.parametrize(
    "source, error, message",
    [
        ("/no/such/model", MissingFileError, "pretrained_model_name_or_path: no such folder /no/such/model"),
        ("./no-such-model", MissingFileError, "no such folder ./no-such-model"),
        ("", InputError, "pretrained_model_name_or_path is empty"),
        (None, InputTypeError, "pretrained_model_name_or_path must be a folder path or a Hub model id"),
        (42, InputTypeError, "got int: 42"),
    ],
)
def test_a_source_that_is_not_there_is_named(source, error, message):
    with pytest.raises(error, match=message):
        MultiTaskModel.from_pretrained(source)


def test_an_empty_folder_and_a_file_are_named(saved, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="empty holds no config.json"):
        MultiTaskModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileError, match="config.json is a file, not a model folder"):
        MultiTaskModel.from_pretrained(saved / "config.json")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"allow_missing_weights": "no"}, InputTypeError, "allow_missing_weights must be True or False, got 'no'"),
        ({"allow_missing_weights": 1}, InputTypeError, "allow_missing_weights must be True or False, got 1"),
        ({"dtype": "fp42"}, InputError, "dtype must be 'auto', one of"),
        ({"tokenizer": "bert"}, InputTypeError, "tokenizer must be a tokenizer object"),
    ],
)
def test_options_are_checked(saved, tmp_path, kwargs, error, message):
    folder = copy_with(saved, tmp_path, weights=without("heads.topic."))  # what a truthy string would let load
    with pytest.raises(error, match=message):
        MultiTaskModel.from_pretrained(folder, **kwargs)
