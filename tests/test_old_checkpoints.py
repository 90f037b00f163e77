"""Models saved before the task-type refactor load and give the same outputs: tiny models of every backbone family
and every task type, saved by the code of commit df231f9 with their outputs (`fixtures/make_v0_1_checkpoints.py`).

Their weights include heads with their own copies of the top layers, which the old code ran through forward hooks
and today's code runs as plain modules on the hidden states entering the shared top layers: the same outputs show
the two are the same computation, on every family."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_mtl import MultiTaskModel

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints-v0.1"


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "modernbert"])
def test_v0_1_checkpoint_loads_with_the_same_weights_and_outputs(family):
    folder = FIXTURES / family
    expected = json.loads((folder / "expected.json").read_text())
    model = MultiTaskModel.from_pretrained(folder).eval()
    # Every saved tensor has a place of the same shape, and nothing is new or missing.
    assert {name: list(value.shape) for name, value in model.state_dict().items()} == expected["state_dict"]
    texts, pairs = expected["texts"], [tuple(pair) for pair in expected["pairs"]]
    np.testing.assert_allclose(model.encode(texts), expected["encode"], atol=1e-5)
    np.testing.assert_allclose(model.encode(texts, normalize=False), expected["encode_raw"], atol=1e-5)
    with torch.no_grad():
        logits = model(**model.tokenize(texts, return_token_type_ids=False)).logits
    assert set(logits) == set(expected["logits"])
    for name, value in expected["logits"].items():
        np.testing.assert_allclose(logits[name].numpy(), value, atol=1e-5, err_msg=name)
    _assert_same(model.predict(texts), expected["predict"])
    _assert_same(model.predict(pairs), expected["predict_pairs"])


def _assert_same(got, want, path="prediction"):
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            _assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for index, (a, b) in enumerate(zip(got, want)):
            _assert_same(a, b, f"{path}[{index}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), path
    else:
        assert got == want, path
