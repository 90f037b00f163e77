"""One validation layer: the Python API, the command line and the HTTP service run the same checks
(`validation_mtl`, `io_mtl.check_model_folder`), so the same bad input gets the same problem named by each, after the
location each names it by (`sentences[1]`, `argument 2`, `texts[1]`)."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import numpy as np
import pytest
import torch
from test_service import ServerThread

from modeling_mtl import MultiTaskConfig, MultiTaskModel
from validation_mtl import (
    InputError,
    InputTypeError,
    UserError,
    check_int,
    check_max_seq_length,
    check_tasks,
    is_int,
    position_limit,
    requested_tasks,
    resolve_max_seq_length,
)

TASKS = [
    {"name": "topic", "labels": ["a", "b"]},
    {"name": "ner", "type": "token_classification", "labels": ["O", "B-PER", "I-PER"]},
    {"name": "nli", "type": "pair_classification", "labels": ["no", "yes"]},
]


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("validation_model")
    torch.manual_seed(0)
    MultiTaskModel.from_backbone(tiny_bert, tasks=TASKS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return MultiTaskModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def server(model):
    from multitask_st.service import create_app

    with ServerThread(create_app(model)) as url:
        yield url


def api_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    return str(caught.value)


def cli_error(capsys, *args: str) -> str:
    from multitask_st.cli import main

    assert main(list(args)) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "Traceback" not in line
    return re.sub(r"^mtl \w+: error: ", "", line)


def service_error(server: str, path: str, body: dict) -> str:
    response = httpx.post(server + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    return response.json()["detail"]


def problem(message: str, where: str) -> str:
    assert message.startswith(where), (message, where)
    return message[len(where) :]


def test_a_bad_text_is_the_same_error_from_the_api_the_cli_and_the_service(model, model_dir, server, capsys, tmp_path):
    bad = "ab\ud800"
    api = api_error(lambda: model.encode(["fine", bad]))
    cli = cli_error(capsys, "encode", "--model", str(model_dir), "fine", bad, "-o", str(tmp_path / "x.npy"))
    http = service_error(server, "/embed", {"texts": ["fine", bad]})
    expected = " holds a lone surrogate (U+D800) at character 2: not valid text"
    assert problem(api, "sentences[1]") == problem(cli, "argument 2") == problem(http, "texts[1]") == expected


def test_an_empty_side_of_a_pair_is_the_same_error_everywhere(model, model_dir, server, capsys):
    api = api_error(lambda: model.predict([("a", "b"), ("c", " ")]))
    cli = cli_error(capsys, "predict", "--model", str(model_dir), "--pair", "a", "b", "--pair", "c", " ")
    http = service_error(server, "/predict", {"pairs": [["a", "b"], ["c", " "]]})
    expected = " is empty: both texts of a pair must be given"
    # one rule; each caller names the side as its user wrote the pair
    assert problem(api, "sentences[1][1]") == problem(http, "pairs[1][1]") == problem(cli, "--pair 2 (second text)")
    assert problem(api, "sentences[1][1]") == expected


@pytest.mark.parametrize(
    "tasks, pairs, expected",
    [
        (["nope"], False, ": unknown task(s) ['nope']; this model's tasks are ['topic', 'ner', 'nli']"),
        (["nli"], False, ": task(s) ['nli'] take text pairs ({pairs}), not single texts"),
        (["topic"], True, ": task(s) ['topic'] take single texts, not pairs"),
    ],
)
def test_a_task_that_does_not_fit_is_the_same_error_everywhere(
    model, model_dir, server, capsys, tasks, pairs, expected
):
    """One rule; the hint says how *this* caller gives pairs (tuples, `--pair`, a JSON field)."""
    inputs = [("a", "b")] if pairs else ["a"]
    api = api_error(lambda: model.predict(inputs, tasks=tasks))
    flags = ["--pair", "a", "b"] if pairs else ["a"]
    cli = cli_error(capsys, "predict", "--model", str(model_dir), *flags, "--tasks", ",".join(tasks))
    body = {"pairs": [["a", "b"]]} if pairs else {"texts": ["a"]}
    http = service_error(server, "/predict", {**body, "tasks": tasks})
    assert problem(api, "tasks") == expected.format(pairs="(text, text_pair) tuples or [text, text_pair] lists")
    assert problem(cli, "--tasks") == expected.format(pairs="--pairs FILE or --pair TEXT TEXT_PAIR")
    assert problem(http, "tasks") == expected.format(pairs='"pairs": a list of [text, text_pair] lists')


def test_one_rule_for_a_model_folder(model_dir, tmp_path, capsys):
    """The CLI once accepted `pytorch_model.bin` where `from_pretrained` refused it: one rule now holds (safetensors
    weights; pickled ones are named and refused), checked by `io_mtl.check_model_folder` for all three."""
    from multitask_st.service import create_app

    folder = tmp_path / "pickled"
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    expected = f"{folder} holds no model*.safetensors weights (pytorch_model.bin is pickled weights"
    assert api_error(lambda: MultiTaskModel.from_pretrained(folder)).startswith(expected)
    assert api_error(lambda: create_app(str(folder))).startswith(expected)
    assert cli_error(capsys, "encode", "--model", str(folder), "x", "-o", str(tmp_path / "x.npy")).startswith(expected)


def test_one_max_length_rule_for_the_config_and_encode(model):
    """`encode(max_seq_length=)` checked only `>= 2` where the config checked the backbone's positions, so a long
    text then failed inside torch: both run `check_max_seq_length` now."""
    limit = position_limit(model.config.backbone_config)
    message = f"max_seq_length={limit + 1} exceeds the {limit} token positions the backbone can encode"
    with pytest.raises(InputError, match=re.escape(message)):
        model.encode(["a long text " * 200], max_seq_length=limit + 1)
    with pytest.raises(InputError, match=re.escape(message)):
        MultiTaskConfig(backbone_config=model.config.backbone_config, max_seq_length=limit + 1)
    assert model.encode(["a long text " * 200], max_seq_length=limit).shape == (1, 32)


def test_one_max_length_resolver():
    """The fallback was 256 in the config, 512 in the resolver and 512 in the service: the resolver decides for all
    three now (the service reads the config's value)."""
    from transformers import BertConfig, RobertaConfig

    assert MultiTaskConfig(backbone_config=BertConfig(max_position_embeddings=512)).max_seq_length == 512
    assert MultiTaskConfig(backbone_config=BertConfig(max_position_embeddings=128)).max_seq_length == 128
    # RoBERTa's positions start after the padding index: 130 positions hold 128 tokens.
    assert MultiTaskConfig(backbone_config=RobertaConfig(max_position_embeddings=130)).max_seq_length == 128
    assert resolve_max_seq_length(BertConfig(), type("T", (), {"model_max_length": 64})()) == 64
    assert resolve_max_seq_length(BertConfig(), None, {"max_seq_length": 200}) == 200
    with pytest.raises(InputError, match="the checkpoint's max_seq_length=600 exceeds the 512 token positions"):
        resolve_max_seq_length(BertConfig(), None, {"max_seq_length": 600})


def test_an_int_that_is_not_a_bool():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(np.bool_(True)) and not is_int(3.0)
    with pytest.raises(InputError, match="batch_size must be an int from 1 to 8, got True"):
        check_int("batch_size", True, minimum=1, maximum=8)
    with pytest.raises(InputError, match="max_seq_length must be an int >= 2, got 1"):
        check_max_seq_length(1)


def test_a_flag_given_as_a_string_is_refused():
    """A hand-edited `"normalize": "false"` counted as true (a non-empty string): a flag is `True` or `False`."""
    from transformers import BertConfig

    with pytest.raises(InputTypeError, match="normalize must be True or False, got 'false'"):
        MultiTaskConfig(backbone_config=BertConfig(), normalize="false")


@pytest.mark.parametrize("tasks", [5, 2.5, {"topic": 1}, b"topic"])
def test_tasks_that_are_not_names_are_the_same_error_from_every_entry_point(model, tasks):
    """`predict(tasks=5)` read the value as a list before `check_tasks` saw it ("'int' object is not iterable"):
    `requested_tasks` is the one rule, for `check_tasks`, `predict` and `forward` alike."""
    expected = f"tasks must be a task name or a list of task names, got {type(tasks).__name__}"
    with pytest.raises(InputTypeError, match=re.escape(expected)):
        requested_tasks(tasks)
    with pytest.raises(InputTypeError, match=re.escape(expected)):
        check_tasks(tasks, model.config)
    assert api_error(lambda: model.predict("a", tasks=tasks)) == expected
    batch = model.tokenize(["a"])
    assert api_error(lambda: model(**batch, tasks=tasks)) == expected
