"""The checks of what callers hand the model: texts, pairs, words, task names, numbers, lengths and batch sizes.

Each rule is written once, here, and the Python API (`inference_mtl`), the command line (`multitask_st.cli`) and the
HTTP service (`multitask_st.service`) all call it, so the same input gets the same error from each of them. An error
reads `<where>: <problem>`, where `<where>` is the caller's own name for the input (`sentences[2]` in Python,
`texts[2]` in a request body, `reviews.txt:3` on the command line) and `<problem>` is the same text everywhere.

Every error raised for something the caller can fix is a `UserError`: the command-line tools print it as one line
(set `MTL_DEBUG=1` to see its traceback too), while anything else, a bug included, keeps its traceback.

This file travels with every checkpoint (relative imports from the other model files), so it stays self-contained:
standard library and numpy only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------- errors


class UserError(Exception):
    """Something the caller gave (an input, an option, a file) is wrong; the message says what and where."""


class InputError(UserError, ValueError):
    """A value that cannot be used: out of range, malformed, or not fit for the task asked."""


class InputTypeError(UserError, TypeError):
    """A value of the wrong type (a number where a text belongs, a dict where a list does)."""


class InputLimitError(InputError):
    """More inputs than a limit allows (the HTTP service answers it with 413)."""


class FileError(UserError, OSError):
    """A file or folder that is missing, incomplete or damaged."""


class MissingFileError(FileError, FileNotFoundError):
    """A file or folder that is not there."""


class DataError(InputError):
    """Bad training data: the message names the task, file, split, row and column where it can."""


# ---------------------------------------------------------------------------------------------- numbers


def is_int(value: Any) -> bool:
    """An integer (Python or numpy) that is not a bool: `True` is not a count."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite real number (int or float, Python or numpy) that is not a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(value)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within `[minimum, maximum]`, or an `InputError` naming `name`."""
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = _bounds(minimum, maximum)
        raise InputError(f"{name} must be an int{bounds}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """`value` as a finite float within its bounds (`open_low` / `open_high` exclude them), or an `InputError`."""
    ok = is_number(value)
    if ok and minimum is not None:
        ok = value > minimum if open_low else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_high else value <= maximum
    if not ok:
        if minimum is not None and maximum is not None:
            where = f" in {'(' if open_low else '['}{minimum:g}, {maximum:g}{')' if open_high else ']'}"
        elif minimum is not None:
            where = f" {'>' if open_low else '>='} {minimum:g}"
        elif maximum is not None:
            where = f" {'<' if open_high else '<='} {maximum:g}"
        else:
            where = ""
        raise InputError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_flag(name: str, value: Any, allow_none: bool = True) -> bool | None:
    """`True`, `False` (or `None` where allowed); anything else, a string "false" included, is an error."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        choices = "True, False or None" if allow_none else "True or False"
        raise InputTypeError(f"{name} must be {choices}, got {value!r}")
    return bool(value)


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def check_batch_size(value: Any, name: str = "batch_size") -> int:
    return check_int(name, value, minimum=1)


# ---------------------------------------------------------------------------------------------- texts

# Half of a UTF-16 surrogate pair on its own: Python strings and JSON ("\ud800") can hold one, UTF-8 cannot encode
# it, so no tokenizer can read it. Command-line arguments that are not valid UTF-8 arrive as U+DC80..U+DCFF.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: Any, max_chars: int | None = None) -> str | None:
    """What is wrong with one text, or `None`: the one rule for a text, whoever checks it."""
    if not isinstance(text, str):
        return f"must be a string, got {type(text).__name__}: {text!r:.80}"
    match = _LONE_SURROGATE.search(text)
    if match:
        code = ord(match.group())
        byte = f", the byte 0x{code - 0xDC00:02x} of invalid UTF-8" if 0xDC80 <= code <= 0xDCFF else ""
        return f"holds a lone surrogate (U+{code:04X}{byte}) at character {match.start()}: not valid text"
    if max_chars is not None and len(text) > max_chars:
        return f"has {len(text)} characters; at most {max_chars} per text"
    return None


def check_text(text: Any, where: str, max_chars: int | None = None) -> str:
    problem = text_problem(text, max_chars)
    if problem is not None:
        error = InputTypeError if not isinstance(text, str) else InputError
        raise error(f"{where} {problem}")
    return text


def check_texts(
    items: Any,
    argument: str = "sentences",
    *,
    max_items: int | None = None,
    max_chars: int | None = None,
    allow_empty: bool = True,
) -> list[str]:
    """`items` (an iterable of strings) as a list, each text checked (`check_text`); errors name `argument[i]`."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise InputTypeError(f"{argument} must be a string or a list of strings, got {type(items).__name__}")
    texts = list(items)
    if not texts and not allow_empty:
        raise InputError(f"{argument} is empty: send at least one text")
    if max_items is not None and len(texts) > max_items:
        raise InputLimitError(f"{argument} has {len(texts)} texts; at most {max_items} per request")
    for index, text in enumerate(texts):
        check_text(text, f"{argument}[{index}]", max_chars)
    return texts


def check_pair(
    a: Any, b: Any, where: str, max_chars: int | None = None, sides: tuple[str, str] = ("[0]", "[1]")
) -> tuple[str, str]:
    """A pair of valid texts, neither of them empty: a pair task scores two texts (as in training). Errors name
    `where` and the side as the caller spells it (`sides`: `[0]`/`[1]` for lists, words for a command line)."""
    for side, text in zip(sides, (a, b)):
        check_text(text, f"{where}{side}", max_chars)
        if not text.strip():
            raise InputError(f"{where}{side} is empty: both texts of a pair must be given")
    return a, b


def check_words(words: Any, where: str) -> list[str]:
    """A pre-split sentence: a list of word strings."""
    if not isinstance(words, list):
        raise InputTypeError(f"{where} must be a list of words, got {type(words).__name__}")
    for index, word in enumerate(words):
        check_text(word, f"{where}[{index}]")
    return words


# ---------------------------------------------------------------------------------------------- tasks


# How the Python API takes pairs; the CLI and the service name their own way (`check_tasks(pair_input=...)`).
PAIR_INPUT = "(text, text_pair) tuples or [text, text_pair] lists"


def check_tasks(
    requested: Any, config: Any, pairs: bool | None = None, argument: str = "tasks", pair_input: str = PAIR_INPUT
) -> list[str] | None:
    """The tasks a call asks for, checked against the model's tasks and, when `pairs` is given, the kind of input
    they take. `None` stays `None` (every task of that kind) but is refused when the model has no such task.

    Args:
        requested: a task name, an iterable of names, or `None`.
        config: the model's `MultiTaskConfig` (its `task_names` and `task(name).takes_pairs`).
        pairs: whether the inputs are text pairs (`None`: do not check the kind).
        argument: the caller's name for the tasks (`tasks`, `--tasks`).
        pair_input: how the caller gives pairs, for the hint when pairs were needed.
    """
    names = config.task_names
    kind = "pair" if pairs else "single-text"
    requested = requested_tasks(requested, argument)
    if requested is None:
        if pairs is not None and not any(config.task(name).takes_pairs == pairs for name in names):
            hint = "" if pairs else f"; give it pairs: {pair_input}"
            raise InputError(f"this model has no {kind} tasks (its tasks: {_kinds(config)}){hint}")
        return None
    tasks = list(dict.fromkeys(requested))
    if not tasks:
        raise InputError(f"{argument} is empty: leave it out for every task, or name at least one")
    unknown = [name for name in tasks if not isinstance(name, str) or name not in names]
    if unknown:
        raise InputError(f"{argument}: unknown task(s) {unknown}; this model's tasks are {names}")
    if pairs is not None:
        wrong = [name for name in tasks if config.task(name).takes_pairs != pairs]
        if wrong:
            needs = "single texts" if pairs else f"text pairs ({pair_input})"
            raise InputError(f"{argument}: task(s) {wrong} take {needs}, not {kind.replace('-', ' ')}s")
    return tasks


def requested_tasks(requested: Any, argument: str = "tasks") -> list[Any] | None:
    """A task name or an iterable of them as a list (`None` stays `None`), before anything reads them as a list: a
    number or a dict is an `InputTypeError` naming `argument`. `check_tasks` then checks the names themselves."""
    if requested is None:
        return None
    if isinstance(requested, str):
        return [requested]
    if isinstance(requested, (bytes, dict)) or not isinstance(requested, Iterable):
        raise InputTypeError(f"{argument} must be a task name or a list of task names, got {type(requested).__name__}")
    return list(requested)


def _kinds(config: Any) -> dict[str, str]:
    return {name: "pair" if config.task(name).takes_pairs else "text" for name in config.task_names}


# ---------------------------------------------------------------------------------------------- lengths

# The truncation length when nothing else decides it: what BERT-style encoders were trained with at most.
DEFAULT_MAX_SEQ_LENGTH = 512


def position_limit(backbone_config: Any) -> int | None:
    """How many token positions the backbone can encode (`max_position_embeddings`, less RoBERTa's padding offset
    of 2 positions that a text can never use), or `None` when it has no fixed limit."""
    limit = getattr(backbone_config, "max_position_embeddings", None)
    if not is_int(limit) or limit < 2:
        return None
    if getattr(backbone_config, "model_type", None) in (
        "roberta",
        "xlm-roberta",
        "camembert",
        "longformer",
        "mpnet",
        "data2vec-text",
    ):
        limit -= 2
    return int(limit)


def check_max_seq_length(value: Any, backbone_config: Any = None, name: str = "max_seq_length") -> int:
    """A truncation length: an int >= 2 that the backbone's positions can hold."""
    value = check_int(name, value, minimum=2)
    limit = position_limit(backbone_config) if backbone_config is not None else None
    if limit is not None and value > limit:
        raise InputError(f"{name}={value} exceeds the {limit} token positions the backbone can encode")
    return value


def resolve_max_seq_length(
    backbone_config: Any,
    tokenizer: Any = None,
    sentence_transformers_settings: dict[str, Any] | None = None,
    requested: int | None = None,
) -> int:
    """The truncation length, decided in one place for every caller: the requested one (checked); else a
    sentence-transformers checkpoint's `max_seq_length`; else the smallest of `DEFAULT_MAX_SEQ_LENGTH`, the
    tokenizer's `model_max_length` and the backbone's positions (a tokenizer without a limit reports ~1e30, so it
    cannot decide alone)."""
    if requested is not None:
        return check_max_seq_length(requested, backbone_config)
    configured = (sentence_transformers_settings or {}).get("max_seq_length")
    if configured:
        return check_max_seq_length(int(configured), backbone_config, "the checkpoint's max_seq_length")
    candidates = [DEFAULT_MAX_SEQ_LENGTH]
    model_max = getattr(tokenizer, "model_max_length", None)
    if is_int(model_max) and 1 < model_max < 100_000:
        candidates.append(int(model_max))
    limit = position_limit(backbone_config)
    if limit is not None:
        candidates.append(limit)
    return min(candidates)


__all__ = [
    "DEFAULT_MAX_SEQ_LENGTH",
    "DataError",
    "FileError",
    "InputError",
    "InputLimitError",
    "InputTypeError",
    "MissingFileError",
    "UserError",
    "check_batch_size",
    "check_flag",
    "check_int",
    "check_max_seq_length",
    "check_number",
    "check_pair",
    "check_tasks",
    "check_text",
    "check_texts",
    "check_words",
    "is_int",
    "is_number",
    "position_limit",
    "requested_tasks",
    "resolve_max_seq_length",
    "text_problem",
]
