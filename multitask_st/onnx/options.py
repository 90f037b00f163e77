"""What an ONNX export is made of, named once (no torch, no onnxruntime: the command line imports it cheaply)."""

from __future__ import annotations

from typing import Any

ONNX_CONFIG_NAME = "onnx_config.json"  # written last: its presence marks a complete export
MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
PAIR_HEADS_FILE = "pair_heads.onnx"
FORMAT_VERSION = 2  # 2: layer norms and GELU bias adds unfused for CPU (older exports are made again)
DEFAULT_OPSET = 17

# int8 schemes: onnxruntime dynamic quantisation of the encoder's matmuls in the fused fp32 graph (int8 weights,
# uint8 activations quantised per tensor at run time; projection and heads stay float32), compared in docs/ONNX.md.
# - "outlier-split" (default): per-channel weights, and the few input channels of a matmul whose calibrated range is
#   far above the others (LayerNorm outlier features, rare huge GELU units) computed in float32 by a thin side
#   matmul, so they no longer set the activation scale of every other channel.
# - "per-channel": one weight scale per output channel, nothing kept in float32.
# - "per-tensor": one weight scale per matrix (what optimum's avx512_vnni/avx2 dynamic configurations do).
QUANTIZATION: dict[str, dict[str, Any]] = {
    "outlier-split": {"per_channel": True, "split_outliers": True},
    "per-channel": {"per_channel": True, "split_outliers": False},
    "per-tensor": {"per_channel": False, "split_outliers": False},
}
SCHEMES = tuple(QUANTIZATION)
DEFAULT_QUANTIZATION = SCHEMES[0]


def output_name(task: str) -> str:
    """The graph output holding a task's logits."""
    return f"logits.{task}"
