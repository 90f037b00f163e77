"""The `mtl` command line: encode, predict, similarity, train, push and serve.

Examples:

```bash
mtl encode --model out/ "A man plays guitar." "A woman sings." --output emb.npy
mtl predict --model out/ --file reviews.jsonl --tasks sentiment --output preds.json
mtl similarity --model out/ "A cat." "A kitten." "A car." --output heatmap.png
mtl train --help          # same options as `python train.py`
mtl push --help           # same options as `python push_to_hub.py`
mtl serve --model out/ --host 127.0.0.1 --port 8000
```

Exit codes: 0 success, 1 the work failed (message on stderr), 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A problem the user can fix; printed as `mtl <command>: error: ...` with exit code 1."""


def _read_texts(args: argparse.Namespace) -> list[str]:
    """Texts from the positional arguments and/or `--file` (plain text: one per line; .jsonl: a `text` field)."""
    texts = list(args.texts or [])
    if args.file:
        path = Path(args.file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"cannot read --file {path}: {error}") from None
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CliError(f"{path}:{number}: not valid JSON ({error})") from None
                value = row.get(args.text_field) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    raise CliError(f"{path}:{number}: expected a string field {args.text_field!r}")
                texts.append(value)
        else:
            texts.extend(line for line in lines if line.strip())
    if not texts:
        raise CliError("no input texts: give them as arguments or with --file")
    return texts


def _load_model(name_or_path: str, device: str | None):
    from modeling_mtl import MultiTaskModel

    if not os.path.isdir(name_or_path) and (os.path.exists(name_or_path) or name_or_path.startswith((".", "/"))):
        raise CliError(f"--model {name_or_path}: no such model folder")
    try:
        model = MultiTaskModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise CliError(f"--model {name_or_path}: cannot load a multi-task model ({error})") from None
    if device:
        model.to(device)
    return model.eval()


def _progress(args: argparse.Namespace, count: int) -> bool:
    # Progress bars only where the work is long enough to need one, and never when told to be quiet.
    return not args.quiet and count > 256


def _write(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text + "\n")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    texts = _read_texts(args)
    model = _load_model(args.model, args.device)
    normalize = True if args.normalize else (False if args.no_normalize else None)
    vectors = model.encode(
        texts, batch_size=args.batch_size, normalize=normalize, show_progress_bar=_progress(args, len(texts))
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".npy":
        np.save(output, vectors.astype(np.float32))
    elif output.suffix == ".jsonl":
        with output.open("w", encoding="utf-8") as handle:
            for text, vector in zip(texts, vectors):
                handle.write(json.dumps({"text": text, "embedding": vector.tolist()}) + "\n")
    else:
        raise CliError(f"--output {output}: use a .npy or .jsonl file name")
    if not args.quiet:
        print(f"wrote {vectors.shape[0]} embeddings of dimension {vectors.shape[1]} to {output}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    model = _load_model(args.model, args.device)
    tasks = args.tasks.split(",") if args.tasks else None
    if tasks:
        unknown = [name for name in tasks if name not in model.task_names]
        if unknown:
            raise CliError(f"--tasks: unknown task(s) {unknown}; this model's tasks are {model.task_names}")
    predictions = model.predict(
        texts, tasks=tasks, batch_size=args.batch_size, show_progress_bar=_progress(args, len(texts))
    )
    rows = [{"text": text, "predictions": prediction} for text, prediction in zip(texts, predictions)]
    if args.output and args.output.endswith(".jsonl"):
        _write(args.output, "\n".join(json.dumps(row, ensure_ascii=False) for row in rows))
    else:
        _write(args.output, json.dumps(rows, indent=2, ensure_ascii=False))
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    if len(texts) < 2:
        raise CliError("similarity needs at least two texts")
    model = _load_model(args.model, args.device)
    vectors = model.encode(
        texts, batch_size=args.batch_size, normalize=True, show_progress_bar=_progress(args, len(texts))
    )
    scores = vectors @ vectors.T
    width = min(40, max(len(text) for text in texts))
    print(" " * (width + 2) + " ".join(f"{i:>6d}" for i in range(len(texts))))
    for i, text in enumerate(texts):
        label = text if len(text) <= width else text[: width - 1] + "…"
        print(f"{label:<{width}}{i:>2d}" + " ".join(f"{value:6.3f}" for value in scores[i]))
    if args.json:
        _write(args.json, json.dumps({"texts": texts, "scores": scores.tolist()}, indent=2, ensure_ascii=False))
    if args.output:
        from .plots import similarity_heatmap

        similarity_heatmap(scores, texts, args.output, title=f"Cosine similarity ({Path(args.model).name})")
        if not args.quiet:
            print(f"wrote heatmap to {args.output}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .service import create_app
    except ImportError as error:
        raise CliError(
            f"serving needs the `serve` extra: pip install 'multitask-sentence-transformer[serve]' ({error})"
        ) from None
    app = create_app(
        _load_model(args.model, args.device),
        max_batch_size=args.max_batch_size,
        max_text_length=args.max_text_length,
        batch_wait_ms=args.batch_wait_ms,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    try:
        target = importlib.import_module(module)
    except ImportError as error:
        raise CliError(f"cannot import {module}.py ({error})") from None
    return int(target.main(argv) or 0)


def _add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", help="input texts (quote each one)")
    parser.add_argument("--file", help="read texts from a file: one per line, or a .jsonl with a text field")
    parser.add_argument("--text-field", default="text", help="field holding the text in a .jsonl --file")
    _add_model_args(parser)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved multi-task model folder or a Hub id")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl",
        description="Multi-task sentence transformer: embed, predict, compare, train, publish and serve.",
        epilog="Run `mtl <command> --help` for the options of one command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    encode = commands.add_parser(
        "encode",
        help="texts -> embeddings (.npy or .jsonl)",
        description="Embed texts and save the vectors as .npy (float32) or .jsonl.",
    )
    _add_input_args(encode)
    encode.add_argument("--output", "-o", required=True, help="output file: .npy or .jsonl")
    norm = encode.add_mutually_exclusive_group()
    norm.add_argument("--normalize", action="store_true", help="L2-normalise (default: the model's setting)")
    norm.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    encode.set_defaults(func=cmd_encode)

    predict = commands.add_parser(
        "predict",
        help="texts -> per-task predictions (JSON)",
        description="Run the task heads and print or save the predictions as JSON.",
    )
    _add_input_args(predict)
    predict.add_argument("--tasks", help="comma-separated tasks to predict (default: all)")
    predict.add_argument("--output", "-o", help="write JSON (or .jsonl) here instead of stdout")
    predict.set_defaults(func=cmd_predict)

    similarity = commands.add_parser(
        "similarity",
        help="texts -> cosine matrix (printed, PNG heatmap)",
        description="Print the cosine-similarity matrix of the texts; optionally save "
        "it as a heatmap PNG with the sentences as tick labels.",
    )
    _add_input_args(similarity)
    similarity.add_argument("--output", "-o", help="heatmap PNG file")
    similarity.add_argument("--json", help="also save {texts, scores} as JSON here")
    similarity.set_defaults(func=cmd_similarity)

    train = commands.add_parser("train", help="fine-tune a model (same options as train.py)", add_help=False)
    train.set_defaults(func=lambda args: _delegate("train", args.rest))
    push = commands.add_parser("push", help="publish a trained model (same options as push_to_hub.py)", add_help=False)
    push.set_defaults(func=lambda args: _delegate("push_to_hub", args.rest))

    serve = commands.add_parser(
        "serve",
        help="start the HTTP service (FastAPI, Swagger UI at /docs)",
        description="Serve a model over HTTP: /embed, /predict, /similarity, /health, "
        "/info; interactive docs at /docs.",
    )
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-size", type=int, default=64, help="most texts per request (more: HTTP 413)")
    serve.add_argument("--max-text-length", type=int, default=10_000, help="most characters per text (more: 422)")
    serve.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long to wait for concurrent requests to batch together"
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # train / push forward everything after the command name untouched (including --help).
    if argv and argv[0] in ("train", "push"):
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
        args.func = _delegate_func(argv[0])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as error:
        print(f"mtl {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as error:
        print(f"mtl {args.command}: error: {error}", file=sys.stderr)
        return 1


def _delegate_func(command: str) -> Any:
    module = "train" if command == "train" else "push_to_hub"
    return lambda args: _delegate(module, args.rest)


if __name__ == "__main__":
    sys.exit(main())
