"""Errors caused by user input (files, parameters, prompts), as opposed to bugs.

The CLI prints these as one line; anything else is a bug and keeps its stack trace.
"""

from __future__ import annotations

# ValueError covers the project's own input errors (ConfigError, DatasetFormatError,
# AdapterFormatError, bad prompts); CheckpointError is a RuntimeError subclass.
from gara.models.checkpoints import CheckpointError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    CheckpointError,
)
