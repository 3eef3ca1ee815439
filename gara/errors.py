"""Errors caused by user input (files, parameters, prompts, weights), as opposed to bugs.

The CLI prints these as one line and exits 2; anything else is a bug and keeps its stack
trace. Kept free of heavy imports: every CLI start imports it.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, verified or loaded."""


class ChecksumMismatchError(CheckpointError):
    """The checkpoint's bytes are not the ones the configuration (or adapter) expects."""


# ValueError covers the project's own input errors (ConfigError, DatasetFormatError,
# AdapterFormatError, bad prompts); OSError unreadable or missing files, named in the message.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, CheckpointError)
