"""The errors the training, serving and publishing tools raise for something the user can fix.

Each is a `validation_mtl.UserError`: `python train.py`, `mtl` and `push_to_hub.py` print it as one line (set
`MTL_DEBUG=1` to see its traceback too); any other exception, a bug included, keeps its traceback.
"""

from __future__ import annotations

from validation_mtl import DataError, FileError, InputError, InputTypeError, UserError


class TrainingError(UserError, RuntimeError):
    """A training run that cannot go on: the message says why and what to do."""


__all__ = ["DataError", "FileError", "InputError", "InputTypeError", "TrainingError", "UserError"]
