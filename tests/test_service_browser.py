"""Swagger UI in a real headless Chromium: the page renders every endpoint and "Try it out" round-trips.

Skips unless Debian's `chromium` + `chromium-driver` and the `selenium` package are installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from screenshot_swagger import check_swagger, find_browser  # noqa: E402
from test_service import ServerThread, make_tiny_model  # noqa: E402

pytest.importorskip("selenium")
if find_browser() is None:
    pytest.skip(
        "chromium / chromedriver not installed (apt-get install -y chromium chromium-driver)", allow_module_level=True
    )


def test_swagger_page_and_try_it_out(tiny_bert, tmp_path):
    from modeling_mtl import MultiTaskModel
    from multitask_st.service import create_app

    model = MultiTaskModel.from_pretrained(make_tiny_model(tiny_bert, tmp_path / "model")).eval()
    with ServerThread(create_app(model)) as url:
        result = check_swagger(url, tmp_path / "swagger.png", texts=["Swagger says hello."])
    assert (tmp_path / "swagger.png").stat().st_size > 10_000
    shown = " ".join(result["operations"])
    for endpoint in ("/embed", "/predict", "/similarity", "/health", "/info"):
        assert endpoint in shown
    assert result["status"] == "200"
    np.testing.assert_allclose(result["response"]["embeddings"][0], model.encode(["Swagger says hello."])[0], atol=1e-5)
