"""The `mtl` command line: encode, predict, similarity, export, train, push and serve.

Examples:

```bash
mtl encode --model out/ "A man plays guitar." "A woman sings." --output emb.npy
mtl predict --model out/ --file reviews.jsonl --tasks sentiment --output preds.json
mtl predict --model out/ --pairs pairs.tsv --tasks nli          # pair tasks: a .tsv of two columns or a .jsonl
mtl similarity --model out/ "A cat." "A kitten." "A car." --output heatmap.png
mtl similarity --model out/ --pair "A cat." "A kitten." --pair "A car." "A bus." --pairwise
mtl export out/ -o out-onnx --int8                              # ONNX graphs (docs/ONNX.md)
mtl train --help          # same options as `python train.py`
mtl push --help           # same options as `python push_to_hub.py`
mtl serve --model out/ --host 127.0.0.1 --port 8000
```

Exit codes (docs/CLI.md): 0 success; 1 the work cannot be done or failed (a file, the model, the device, the port,
the input); 2 bad command line (unknown option, a value out of range, options that contradict each other);
130 interrupted. A problem with what was given is one line on stderr (`MTL_DEBUG=1` adds its traceback); anything
else, a bug included, keeps its traceback. Everything that can be checked before the model runs (output paths,
inputs, device, model folder, port) is checked first, by the same checks the Python API and the service run
(`validation_mtl`, `io_mtl.check_model_folder`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import importlib.util
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from validation_mtl import UserError, check_pair, check_tasks, check_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
HEATMAP_SUFFIXES = (".png", ".svg", ".pdf")
PAIR_OPTIONS = "--pairs FILE or --pair TEXT TEXT_PAIR"  # how this command line takes pairs, for its messages


class CliError(UserError):
    """A problem the user can fix; printed as `mtl <command>: error: ...` with exit code 1."""

    exit_code = EXIT_FAILED


class UsageError(CliError):
    """The command line itself is wrong (contradicting options): exit code 2, like argparse's own errors."""

    exit_code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `mtl serve: error: argument --port: ...`."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ---------------------------------------------------------------------------------------------------- option types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return value


def _device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    return text


# ---------------------------------------------------------------------------------------------------- checks


def _check_output(value: str, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """The output file `value`, or a `CliError` now (before any work) if it cannot be written."""
    path = Path(value).expanduser()
    if suffixes and path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + " or " + suffixes[-1] if len(suffixes) > 1 else suffixes[0]
        raise CliError(f"{option} {value}: use a {names} file name")
    if path.is_dir():
        raise CliError(f"{option} {value}: is a folder; give a file name")
    from io_mtl import holds_model  # here, not above: `mtl --help` stays clear of torch

    if holds_model(path.parent):
        raise CliError(f"{option} {value}: {path.parent} holds a model; write outputs outside a model's folder")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"{option} {value}: {ancestor} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as error:
        raise CliError(f"{option} {value}: cannot write in {path.parent} ({error.strerror or error})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise CliError(f"{option} {value}: the file exists and is not writable")
    return path


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Write to a temporary file beside `path`, renamed over it only when complete: no half-written outputs."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(
                f"--device {device}: no CUDA GPU is available here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use --device cpu"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif target.type == "mps":
        if not torch.backends.mps.is_available():
            raise CliError(f"--device {device}: Apple's MPS backend is not available here; use --device cpu")
    elif target.type != "cpu":
        try:
            torch.empty(1, device=target)
        except Exception as error:  # any backend: whatever torch says about it
            raise CliError(f"--device {device}: not usable here ({error})") from None


def _model_config(name_or_path: str, backend: str = "torch"):
    """The `MultiTaskConfig` of a local model folder, checked (`io_mtl.check_model_folder`, the rule
    `from_pretrained` and the service apply; an ONNX export folder for `--backend onnx*`), without loading weights;
    `None` for a Hub id."""
    path = Path(name_or_path)
    if path.is_dir():
        from configuration_mtl import MultiTaskConfig
        from io_mtl import check_model_folder, read_model_config

        if backend != "torch" and (path / "onnx_config.json").is_file():  # an `mtl export` folder: no safetensors
            return read_model_config(path)
        check_model_folder(path)
        return MultiTaskConfig.from_pretrained(path)
    if path.exists():
        raise CliError(f"--model {name_or_path}: not a folder")
    if name_or_path.startswith((".", "/", "~", os.sep)) or name_or_path.count("/") > 1:
        raise CliError(f"--model {name_or_path}: no such model folder")
    return None  # a Hub id: checked when it loads


def _load_model(name_or_path: str, device: str | None, quiet: bool = False, backend: str = "torch"):
    if backend != "torch":
        return _load_onnx(name_or_path, device, backend)
    from transformers.utils import logging as transformers_logging

    from modeling_mtl import MultiTaskModel

    bars = transformers_logging.is_progress_bar_enabled()
    if quiet:  # -q: no "Loading weights" bar either
        transformers_logging.disable_progress_bar()
    try:
        model = MultiTaskModel.from_pretrained(name_or_path)
    except (UserError, OSError, RuntimeError) as error:  # a damaged folder; a Hub id missing or offline
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"--model {name_or_path}: cannot load a multi-task model ({reason})") from error
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    if model.tokenizer is None:
        raise CliError(f"--model {name_or_path}: the folder has no tokenizer; save one beside the weights")
    if device:
        try:
            model.to(device)
        except (RuntimeError, ValueError) as error:
            raise CliError(f"--device {device}: cannot move the model there ({error})") from None
    return model.eval()


def _load_onnx(name_or_path: str, device: str | None, backend: str):
    """The exported graph (`mtl export`, exported on first use for a model folder) through onnxruntime."""
    if device not in (None, "cpu"):
        raise CliError(f"--backend {backend} runs on the CPU: leave out --device {device}")
    if not Path(name_or_path).is_dir():  # a Hub id: the export folder is the user's to choose
        raise CliError(
            f"--model {name_or_path}: --backend {backend} takes a local folder (a saved model, exported into "
            f"MODEL/onnx on first use, or an export folder); export a Hub model first: mtl export {name_or_path} "
            "-o DIR, then --model DIR"
        )
    try:
        from .onnx import OnnxMultiTaskModel
    except ImportError as error:
        raise CliError(f"--backend {backend} needs the `onnx` extra (pip install '.[onnx]'): {error}") from None
    try:
        return OnnxMultiTaskModel.from_pretrained(name_or_path, int8=backend == "onnx-int8")
    except (UserError, OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"--model {name_or_path}: cannot load it with --backend {backend} ({reason})") from error


def _check_tasks(args: argparse.Namespace, config: Any | None, pairs: bool) -> list[str] | None:
    """`--tasks` as a list (None: every task for this input), checked against the model's tasks and the kind of
    input (`validation_mtl.check_tasks`, as `predict` and the service check them); `config` None (a Hub model not
    loaded yet) skips the checks."""
    tasks = None
    if args.tasks is not None:
        tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
        if not tasks:
            raise UsageError(f"--tasks {args.tasks!r}: name at least one task")
    if config is None:
        return tasks
    return check_tasks(tasks, config, pairs, argument="--tasks", pair_input=PAIR_OPTIONS)


def _check_listen(host: str, port: int) -> None:
    """Fail now, not after loading the model, if the server could not listen on host:port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as error:
        raise CliError(f"--host {host}: not an address this machine can listen on ({error})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise CliError(f"--port {port}: address already in use on {host} (another server?)") from None
            if error.errno == errno.EACCES:
                raise CliError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
            raise CliError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None


# ---------------------------------------------------------------------------------------------------- inputs


def _read_lines(path: Path, option: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not part of a text
    except UnicodeDecodeError as error:
        raise CliError(f"cannot read {option} {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise CliError(f"cannot read {option} {path}: {error.strerror or error}") from None


def _jsonl_rows(path: Path, option: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(_read_lines(path, option), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise CliError(f"{path}:{number}: not valid JSON ({error})") from None


def _json_rows(path: Path, option: str) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads("\n".join(_read_lines(path, option)))
    except json.JSONDecodeError as error:
        raise CliError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(rows, list):
        raise CliError(f"{path}: expected a JSON array of inputs, got a {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", row


def _table_rows(path: Path, option: str, columns: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """Rows of a .csv / .tsv file with a header line naming its columns (the header is never an input)."""
    lines = _read_lines(path, option)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(lines, delimiter=delimiter, strict=True)
    try:
        header = reader.fieldnames or []
        missing = [column for column in columns if column not in header]
        if missing:
            raise CliError(
                f"{path}: the header line names no {' or '.join(repr(c) for c in missing)} column (it names "
                f"{header}); a {path.suffix} file starts with a header line (--text-field / --pair-field pick columns)"
            )
        for row in reader:
            if any(value is None for value in row.values()) or None in row:
                raise CliError(f"{path}:{reader.line_num}: expected {len(header)} columns, like the header line")
            yield f"{path}:{reader.line_num}", row
    except csv.Error as error:
        raise CliError(f"{path}:{reader.line_num}: not valid {path.suffix[1:].upper()} ({error})") from None


def _file_rows(path: Path, option: str, columns: tuple[str, ...]) -> Iterator[tuple[str, Any]] | None:
    """(where, row) for a structured input file: .jsonl (an object per line), .json (one array), .csv / .tsv (a
    header line, then a row per input); `None` for other files, which are read by the caller's own rule."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path, option)
    if suffix == ".json":
        return _json_rows(path, option)
    if suffix == ".csv" or (suffix == ".tsv" and option == "--file"):
        return _table_rows(path, option, columns)
    return None


def _fields(row: Any, fields: tuple[str, ...], where: str) -> list[str]:
    """The named string fields of one row: an object, or (for a .json array) a string or a list of strings."""
    if isinstance(row, str):
        row = [row]
    if isinstance(row, list) and len(row) == len(fields):
        values = row
    elif isinstance(row, dict):
        values = [row.get(field) for field in fields]
    else:
        shape = "a string" if len(fields) == 1 else f"a list of {len(fields)} strings"
        raise CliError(f"{where}: expected an object with {list(fields)} or {shape}, got {json.dumps(row)[:80]}")
    if not all(isinstance(value, str) for value in values):
        names = " and ".join(repr(field) for field in fields)
        raise CliError(f"{where}: expected string field{'s' if len(fields) > 1 else ''} {names}")
    return values


def _read_texts(args: argparse.Namespace) -> list[str]:
    """Texts from the positional arguments and/or `--file` (plain text: one per line; .jsonl / .json / .csv / .tsv:
    a `text` field or column)."""
    texts = [check_text(text, f"argument {index + 1}") for index, text in enumerate(args.texts or [])]
    if args.file:
        path = Path(args.file)
        fields = (args.text_field,)
        rows = _file_rows(path, "--file", fields)
        if rows is not None:
            texts.extend(check_text(_fields(row, fields, where)[0], where) for where, row in rows)
        else:
            lines = _read_lines(path, "--file")
            texts.extend(check_text(line, f"{path}:{number}") for number, line in enumerate(lines, 1) if line.strip())
    return texts


def _read_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Pairs from `--pair A B` (repeatable) and/or `--pairs FILE` (.jsonl / .json / .csv with text and text_pair
    fields, or a .tsv of two columns and no header)."""
    pairs = [_pair(a, b, f"--pair {index + 1}") for index, (a, b) in enumerate(getattr(args, "pair", None) or [])]
    if getattr(args, "pairs", None):
        path = Path(args.pairs)
        fields = (args.text_field, args.pair_field)
        rows = _file_rows(path, "--pairs", fields)
        if rows is not None:
            pairs.extend(_pair(*_fields(row, fields, where), where) for where, row in rows)
        elif path.suffix.lower() == ".tsv":
            for number, line in enumerate(_read_lines(path, "--pairs"), start=1):
                if not line.strip():
                    continue
                columns = line.split("\t")
                if len(columns) != 2:
                    raise CliError(f"{path}:{number}: expected 2 tab-separated columns, got {len(columns)}")
                if number == 1 and columns == list(fields):
                    continue  # a header line naming the fields is not a pair
                pairs.append(_pair(columns[0], columns[1], f"{path}:{number}"))
        else:
            raise CliError(
                f"--pairs {path}: use a .jsonl, .json or .csv file (text, text_pair fields) or a .tsv (two columns)"
            )
    return pairs


def _pair(a: str, b: str, where: str) -> tuple[str, str]:
    """A pair of valid texts, neither of them empty (`validation_mtl.check_pair`, as in training)."""
    return check_pair(a, b, where, sides=(" (first text)", " (second text)"))


def _read_inputs(args: argparse.Namespace, allow_pairs: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """(texts, pairs): exactly one of them is non-empty."""
    has_texts = bool(args.texts or args.file)
    has_pairs = allow_pairs and bool(getattr(args, "pairs", None) or getattr(args, "pair", None))
    if has_texts and has_pairs:
        raise UsageError("give texts (arguments or --file) or pairs (--pairs or --pair), not both")
    texts = _read_texts(args) if has_texts else []
    pairs = _read_pairs(args) if has_pairs else []
    if not texts and not pairs:
        where = "as arguments or with --file" + (", or pairs with --pairs / --pair" if allow_pairs else "")
        raise CliError(f"no input texts: give them {where}")
    return texts, pairs


# ---------------------------------------------------------------------------------------------------- commands


def _progress(args: argparse.Namespace, count: int) -> bool:
    # Progress bars only where the work is long enough to need one, and never when told to be quiet.
    return not args.quiet and count > 256


def _write(path: Path | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    with _atomic(path) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    output = _check_output(args.output, "--output", (".npy", ".jsonl"))
    texts, _ = _read_inputs(args, allow_pairs=False)
    _check_device(args.device)
    _model_config(args.model, args.backend)
    model = _load_model(args.model, args.device, args.quiet, args.backend)
    normalize = True if args.normalize else (False if args.no_normalize else None)
    vectors = model.encode(
        texts, batch_size=args.batch_size, normalize=normalize, show_progress_bar=_progress(args, len(texts))
    )
    with _atomic(output) as temporary:
        if output.suffix.lower() == ".npy":
            np.save(temporary, vectors.astype(np.float32))
        else:
            with temporary.open("w", encoding="utf-8") as handle:
                for text, vector in zip(texts, vectors):
                    handle.write(json.dumps({"text": text, "embedding": vector.tolist()}, ensure_ascii=False) + "\n")
    if not args.quiet:
        print(f"wrote {vectors.shape[0]} embeddings of dimension {vectors.shape[1]} to {output}", file=sys.stderr)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    output = _check_output(args.output, "--output") if args.output else None
    texts, pairs = _read_inputs(args)
    _check_device(args.device)
    config = _model_config(args.model, args.backend)
    tasks = _check_tasks(args, config, bool(pairs))
    model = _load_model(args.model, args.device, args.quiet, args.backend)
    if config is None:  # a Hub id: check the tasks now that its config is here
        tasks = _check_tasks(args, model.config, bool(pairs))
    inputs = pairs or texts
    predictions = model.predict(
        inputs, tasks=tasks, batch_size=args.batch_size, show_progress_bar=_progress(args, len(inputs))
    )
    if pairs:
        rows = [{"text": a, "text_pair": b, "predictions": p} for (a, b), p in zip(pairs, predictions)]
    else:
        rows = [{"text": text, "predictions": prediction} for text, prediction in zip(texts, predictions)]
    if output is not None and output.suffix.lower() == ".jsonl":
        _write(output, "\n".join(json.dumps(row, ensure_ascii=False) for row in rows))
    else:
        _write(output, json.dumps(rows, indent=2, ensure_ascii=False))
    return EXIT_OK


def _label(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_similarity(args: argparse.Namespace) -> int:
    has_pairs = bool(args.pairs or args.pair)
    if args.pairwise and not has_pairs:
        raise UsageError(f"--pairwise needs pairs ({PAIR_OPTIONS})")
    if args.pairwise and args.output:
        raise UsageError("--output draws a matrix; --pairwise gives one score per pair: save them with --json")
    heatmap = _check_output(args.output, "--output", HEATMAP_SUFFIXES) if args.output else None
    if heatmap is not None and importlib.util.find_spec("matplotlib") is None:
        raise CliError(
            f"--output {args.output}: drawing the heatmap needs matplotlib, which is not installed "
            "(pip install matplotlib, or the `serve` extra); --json saves the scores without it"
        )
    json_output = _check_output(args.json, "--json") if args.json else None
    texts, pairs = _read_inputs(args)
    if texts and len(texts) < 2:
        raise CliError("similarity needs at least two texts (or pairs with --pairs / --pair)")
    _check_device(args.device)
    _model_config(args.model, args.backend)
    model = _load_model(args.model, args.device, args.quiet, args.backend)
    if pairs:
        rows, columns = [a for a, _ in pairs], [b for _, b in pairs]
        scores = model.similarity(rows, columns, pairwise=args.pairwise, batch_size=args.batch_size)
    else:
        rows = columns = texts
        vectors = model.encode(
            texts, batch_size=args.batch_size, normalize=True, show_progress_bar=_progress(args, len(texts))
        )
        scores = vectors @ vectors.T
    if args.pairwise:
        width = min(40, max(len(text) for text in rows + columns))
        for index, ((a, b), score) in enumerate(zip(pairs, scores)):
            print(f"{index:>3d} {score:7.3f}  {_label(a, width):<{width}} | {_label(b, width)}")
        if json_output:
            document = {"pairs": [list(pair) for pair in pairs], "scores": scores.tolist()}
            _write(json_output, json.dumps(document, indent=2, ensure_ascii=False))
        return EXIT_OK
    width = min(40, max(len(text) for text in rows))
    print(" " * (width + 4) + " ".join(f"{i:>6d}" for i in range(len(columns))))
    for i, text in enumerate(rows):
        print(f"{_label(text, width):<{width}}{i:>3d} " + " ".join(f"{value:6.3f}" for value in scores[i]))
    if pairs and not args.quiet:
        print("rows: first texts of the pairs; columns: second texts (diagonal: the pairs)", file=sys.stderr)
    if json_output:
        document = {"texts": rows, "scores": scores.tolist()}
        if pairs:
            document = {"texts": rows, "texts_b": columns, "scores": scores.tolist()}
        _write(json_output, json.dumps(document, indent=2, ensure_ascii=False))
    if heatmap:
        from .plots import similarity_heatmap

        with _atomic(heatmap) as temporary:
            similarity_heatmap(
                scores,
                rows,
                temporary,
                columns=columns if pairs else None,
                title=f"Cosine similarity ({Path(args.model).name})",
            )
        if not args.quiet:
            print(f"wrote heatmap to {heatmap}", file=sys.stderr)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .service import create_app, display_name
    except ImportError as error:
        raise CliError(
            f"serving needs the `serve` extra: pip install 'multitask-sentence-transformer[serve]' ({error})"
        ) from None
    api_key = args.api_key if args.api_key is not None else (os.environ.get("MTL_API_KEY") or None)
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty: give a key, or leave the option out for no authentication")
    _check_listen(args.host, args.port)
    # Beyond this machine, no key means anyone who can reach the port uses the model: only when asked for.
    no_key = args.no_api_key or os.environ.get("MTL_NO_API_KEY") == "1"
    if api_key is None and not no_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise UsageError(
            f"--host {args.host} without an API key serves anyone who can reach it: give --api-key KEY (or set "
            "MTL_API_KEY), or --no-api-key (or MTL_NO_API_KEY=1) to serve without authentication"
        )
    _check_device(args.device)
    _model_config(args.model, args.backend)
    model = _load_model(args.model, args.device, args.quiet, args.backend)
    app = create_app(
        model,
        max_batch_size=args.max_batch_size,
        max_text_length=args.max_text_length,
        batch_wait_ms=args.batch_wait_ms,
        model_name=args.model_name or display_name(args.model),
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        max_call_chars=args.max_call_chars,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency,
    )
    return EXIT_OK


def _delegate(module: str, entry: str, argv: list[str], command: str) -> int:
    import importlib

    try:
        target = importlib.import_module(module)
    except ImportError as error:
        raise CliError(f"cannot import {module}.py ({error})") from None
    program, sys.argv[0] = sys.argv[0], f"mtl {command}"  # argparse's usage line names the program from it
    try:
        return int(getattr(target, entry)(argv) or 0)
    finally:
        sys.argv[0] = program


# ---------------------------------------------------------------------------------------------------- parser


def _add_input_args(parser: argparse.ArgumentParser, pairs: bool = False) -> None:
    parser.add_argument("texts", nargs="*", help="input texts (quote each one)")
    parser.add_argument(
        "--file", help="read texts from a file: one per line, or a .jsonl / .json / .csv / .tsv with a text field"
    )
    parser.add_argument(
        "--text-field", default="text", help="field or column holding the text in a structured --file / --pairs"
    )
    if pairs:
        parser.add_argument(
            "--pairs",
            metavar="FILE",
            help="read text pairs (for pair tasks) from a .jsonl ({text, text_pair} per line) or a .tsv (two columns)",
        )
        parser.add_argument(
            "--pair",
            nargs=2,
            action="append",
            metavar=("TEXT", "TEXT_PAIR"),
            help="one text pair on the command line (repeatable)",
        )
        parser.add_argument("--pair-field", default="text_pair", help="field or column holding the second text")
    _add_model_args(parser)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=os.path.expanduser, help="a saved multi-task model folder or a Hub id"
    )
    parser.add_argument("--device", type=_device, default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx", "onnx-int8"),
        default="torch",
        help="torch (default), or the exported graph through onnxruntime in float32 or int8 (CPU; docs/ONNX.md)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="sentences per forward pass")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mtl",
        description="Multi-task sentence transformer: embed, predict, compare, export, train, publish and serve.",
        epilog="Run `mtl <command> --help` for the options of one command. Exit codes: 0 success, 1 the work "
        "cannot be done (message on stderr), 2 bad command line, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_encode_parser(commands)
    _add_predict_parser(commands)
    _add_similarity_parser(commands)
    _add_export_parser(commands)
    _add_delegated_parsers(commands)
    _add_serve_parser(commands)
    return parser


def _add_encode_parser(commands: argparse._SubParsersAction) -> None:
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


def _add_predict_parser(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict",
        help="texts or text pairs -> per-task predictions (JSON)",
        description="Run the task heads and print or save the predictions as JSON. Texts go to the single-text "
        "tasks, pairs (--pairs / --pair) to the pair tasks (pair_classification, similarity, contrastive).",
    )
    _add_input_args(predict, pairs=True)
    predict.add_argument("--tasks", help="comma-separated tasks to predict (default: all that take this input)")
    predict.add_argument("--output", "-o", help="write JSON (or .jsonl) here instead of stdout")
    predict.set_defaults(func=cmd_predict)


def _add_similarity_parser(commands: argparse._SubParsersAction) -> None:
    similarity = commands.add_parser(
        "similarity",
        help="texts -> cosine matrix (printed, heatmap); pairs -> first texts x second texts, or with --pairwise "
        "one score per pair",
        description="Print the cosine-similarity matrix of the texts (optionally a heatmap with the sentences as "
        "tick labels). With pairs (--pairs / --pair): the matrix of first texts x second texts, or with "
        "--pairwise one score per pair.",
    )
    _add_input_args(similarity, pairs=True)
    similarity.add_argument("--pairwise", action="store_true", help="with pairs: one cosine per pair")
    similarity.add_argument("--output", "-o", help="heatmap image file (.png, .svg or .pdf)")
    similarity.add_argument("--json", help="also save the scores as JSON here")
    similarity.set_defaults(func=cmd_similarity)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    from .onnx.cli import EXPORT_DESCRIPTION, EXPORT_HELP, add_export_arguments, run_export

    export = commands.add_parser("export", help=EXPORT_HELP, description=EXPORT_DESCRIPTION)
    add_export_arguments(export)
    export.set_defaults(func=run_export)


def _add_delegated_parsers(commands: argparse._SubParsersAction) -> None:
    # Listed for --help only: `main` hands `train` / `push` and everything after them to the scripts unparsed.
    commands.add_parser("train", help="fine-tune a model (same options as train.py)", add_help=False)
    commands.add_parser("push", help="publish a trained model (same options as push_to_hub.py)", add_help=False)


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="start the HTTP service (FastAPI, Swagger UI at /docs)",
        description="Serve a model over HTTP: /embed, /predict, /similarity, /health, "
        "/info; interactive docs at /docs. See docs/SERVICE.md.",
    )
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (1-65535)")
    serve.add_argument(
        "--max-batch-size", type=_positive_int, default=64, help="most texts per request, a pair counting 2 (413)"
    )
    serve.add_argument(
        "--max-text-length", type=_positive_int, default=10_000, help="most characters per text (more: 422)"
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=_non_negative_float,
        default=2.0,
        help="how long to wait for concurrent requests to batch together",
    )
    serve.add_argument(
        "--max-call-chars",
        type=_positive_int,
        default=32_768,
        help="most characters per model call; large requests are split and share calls fairly",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=None,
        help="largest request body (413; default: what max-batch-size x max-text-length can need)",
    )
    key = serve.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        default=None,
        help="require this key (Authorization: Bearer KEY or X-API-Key: KEY) on every endpoint but /health and "
        "the docs; default: the MTL_API_KEY environment variable, else no authentication",
    )
    key.add_argument(
        "--no-api-key",
        action="store_true",
        help="serve without a key on a --host other than localhost, which is refused otherwise (also: "
        "MTL_NO_API_KEY=1); a key from MTL_API_KEY still wins",
    )
    serve.add_argument("--model-name", help="name shown by /info and /docs (default: the folder name or Hub id)")
    serve.add_argument(
        "--timeout-keep-alive",
        type=_positive_int,
        default=5,
        help="seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=_positive_int,
        default=None,
        help="most connections and requests at once; more get HTTP 503 (default: no limit)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace")
    )
    serve.set_defaults(func=cmd_serve)


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
    prefix = f"mtl {args.command}"
    try:
        return args.func(args)
    except UserError as error:  # what the user gave: one line (a CliError's own exit code, else 1)
        if os.environ.get("MTL_DEBUG"):
            raise
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_FAILED)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `mtl predict ... | head`: the reader left; say nothing more on the closed pipe
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (OSError, MemoryError) as error:  # the machine: disk full, out of memory, a file it cannot read
        if os.environ.get("MTL_DEBUG"):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"{prefix}: error: {type(error).__name__}: {reason} (MTL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    # Anything else is not the user's to fix: it keeps its traceback.


def _delegate_func(command: str) -> Any:
    # The scripts' own entry points, so that `mtl train` / `mtl push` exit as the scripts do.
    module, entry = ("train", "run") if command == "train" else ("push_to_hub", "main")
    return lambda args: _delegate(module, entry, args.rest, command)


if __name__ == "__main__":
    sys.exit(main())
