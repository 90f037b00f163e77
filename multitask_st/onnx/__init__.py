"""ONNX export of a `MultiTaskModel` and an onnxruntime backend with the same `encode` / `predict` / `similarity`.

One call from a saved model folder to a running model (the first call exports into `MODEL_DIR/onnx`, later calls
load that export; a changed checkpoint is exported again):

```python
from multitask_st.onnx import OnnxMultiTaskModel

model = OnnxMultiTaskModel.from_pretrained("path/to/model", int8=True)
model.encode(["A man plays guitar."])
model.predict("John lives in Paris.")
```

Or in two steps, e.g. to ship only the export (`mtl export MODEL_DIR -o OUT --int8` does the first):

```python
from multitask_st.onnx import OnnxMultiTaskModel, export_onnx

export_onnx("path/to/model", "path/to/export", int8=True)
model = OnnxMultiTaskModel.from_pretrained("path/to/export", int8=True)
```

What is exported (docs/ONNX.md explains the choices):

- `model.onnx`: the whole model as one graph: encoder, pooling, projection and the head of every task whose type
  puts its logits there (`Task.onnx_graph == "text"`: classification, multi-label, regression, token
  classification). Inputs `input_ids` and `attention_mask` (and `token_type_ids` when a task reads texts with
  segments), int64 `(batch, seq)`, right-padded, both axes dynamic. Outputs `features` (the pooled, projected,
  un-normalised vector the heads read), `embeddings` (`features`, L2-normalised when `config.normalize`) and
  `logits.<task>`. Exported with the TorchScript exporter from an eager-attention copy of the model, then fused by
  onnxruntime's transformer optimizer, exact GELU kept, with the fusions whose CPU kernels are slow undone.
- `model_int8.onnx` (with `int8=True`): the same graph with the encoder's matmuls in int8 (`options.QUANTIZATION`).
- `pair_heads.onnx` (for models with pair-classification tasks): inputs `u`, `v` `(pairs, embedding_dim)`, outputs
  `logits.<task>` for each pair-classification head.
- `config.json`, the tokenizer files and `onnx_config.json` (outputs, tasks, how it was made, parity measured at
  export time), so the folder is complete on its own.

The package is split by responsibility: `options` (names and schemes, no torch), `export` (graphs, fusion, parity),
`quantize` (the int8 graph), `session` (onnxruntime sessions), `runtime` (`OnnxMultiTaskModel`), `cli` (`mtl
export`). Importing this package loads none of them: each name below loads its module on first use, so the command
line stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OnnxMultiTaskModel": "runtime",
    "export_onnx": "export",
    "quantize_int8": "quantize",
    "calibration_feeds": "quantize",
    "default_calibration_texts": "quantize",
    "CPU_DISABLED_FUSIONS": "session",
    "disabled_fusions": "session",
    "QUANTIZATION": "options",
    "DEFAULT_OPSET": "options",
    "INT8_FILE": "options",
    "MODEL_FILE": "options",
    "ONNX_CONFIG_NAME": "options",
    "PAIR_HEADS_FILE": "options",
    "DEFAULT_QUANTIZATION": "options",
    "SCHEMES": "options",
    "add_export_arguments": "cli",
    "run_export": "cli",
    "main": "cli",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = sorted(_EXPORTS)
