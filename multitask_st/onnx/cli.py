"""The command line of the ONNX export: `mtl export MODEL -o OUT [--int8]` (also `python -m multitask_st.onnx`).

Importing this module is cheap (no torch, no onnxruntime), so the `mtl` parser (`cli._add_export_parser`) adds the
`export` command without slowing every other command down; `run_export` imports the exporter when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from validation_mtl import UserError

from .options import DEFAULT_OPSET, DEFAULT_QUANTIZATION, ONNX_CONFIG_NAME, SCHEMES

EXPORT_HELP = "saved model -> ONNX folder (one graph with every head; --int8)"
EXPORT_DESCRIPTION = (
    "Export a saved multi-task model to ONNX: model.onnx (encoder, pooling, projection and every single-text head "
    "in one graph), pair_heads.onnx (pair-classification heads, if any), with --int8 also model_int8.onnx; plus "
    "config.json, the tokenizer and onnx_config.json. Load it with OnnxMultiTaskModel.from_pretrained(OUT). "
    "See docs/ONNX.md."
)


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mtl export MODEL -o OUT [--int8]` (wire with `set_defaults(func=run_export)`)."""
    parser.add_argument("model", help="a saved multi-task model folder (save_pretrained) or a Hub id")
    parser.add_argument(
        "-o", "--output", default=None, help="export folder (default: MODEL/onnx for a folder; a Hub id needs -o)"
    )
    parser.add_argument("--int8", action="store_true", help="also write model_int8.onnx (int8 weights)")
    parser.add_argument(
        "--quantization",
        default=DEFAULT_QUANTIZATION,
        choices=SCHEMES,
        help=f"int8 scheme (default {DEFAULT_QUANTIZATION}; docs/ONNX.md compares them)",
    )
    parser.add_argument(
        "--calibration-file",
        default=None,
        help="texts (one per line) that find the int8 outlier channels (default: ~500 shipped sentences)",
    )
    parser.add_argument("--no-optimize", action="store_true", help="skip onnxruntime's transformer fusion")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run `mtl export`; returns the exit code (0 done, 1 failed with a message on stderr)."""
    if args.output is None and not Path(args.model).is_dir():
        print(f"mtl export: error: {args.model} is not a local folder: give the export folder with -o", file=sys.stderr)
        return 1
    try:
        from .export import export_onnx

        calibration = None
        if getattr(args, "calibration_file", None):
            try:
                lines = Path(args.calibration_file).read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as error:
                raise UserError(
                    f"--calibration-file {args.calibration_file}: not UTF-8 text ({error.reason} at byte {error.start})"
                ) from None
            calibration = [line for line in lines if line.strip()]
            if not calibration:
                raise UserError(f"--calibration-file {args.calibration_file} holds no text")
        folder = export_onnx(
            args.model,
            args.output,
            int8=args.int8,
            quantization=args.quantization,
            optimize=not args.no_optimize,
            opset=args.opset,
            calibration_texts=calibration,
        )
    except (UserError, OSError, ImportError) as error:  # what the user can fix; anything else keeps its traceback
        if os.environ.get("MTL_DEBUG"):
            raise
        print(f"mtl export: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        description = json.loads((folder / ONNX_CONFIG_NAME).read_text(encoding="utf-8"))
        diff = max(description["parity"]["max_abs_diff"].values())
        files = ", ".join(description["files"].values())
        fused = "fused" if description["fused"] else "unfused"
        print(f"wrote {files} ({fused}, max abs diff to PyTorch {diff:.1e}) to {folder}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m multitask_st.onnx MODEL -o OUT [--int8]`: `mtl export`."""
    parser = add_export_arguments(argparse.ArgumentParser(prog="mtl export", description=EXPORT_DESCRIPTION))
    return run_export(parser.parse_args(argv))


__all__ = ["EXPORT_DESCRIPTION", "EXPORT_HELP", "add_export_arguments", "main", "run_export"]

if __name__ == "__main__":
    sys.exit(main())
