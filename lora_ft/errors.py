"""One exception type for everything the user can fix, and the exit codes loraft promises.

The CLI turns a `LoraftError` into one line on stderr and its exit code; anything else is a bug
(exit 1, with the traceback under `--debug`).
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
# `loraft eval` gates: the command worked and the adapter failed a threshold (CI tells this from a crash, 1, or bad input, 2).
EXIT_GATE = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class LoraftError(Exception):
    """A problem with the user's input or environment, stated as one line with its fix."""

    exit_code = EXIT_USER

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(LoraftError):
    """The YAML file or a --set override does not fit the schema."""


class DataError(LoraftError):
    """A data file is missing, unreadable or has a malformed row."""


class ModelError(LoraftError):
    """The model cannot be found or does not fit the config (e.g. unknown target modules)."""


class VerificationError(LoraftError):
    """A self-check failed (e.g. merged logits differ from base+adapter): exit 1, nothing kept."""

    exit_code = EXIT_INTERNAL


class Interrupted(LoraftError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = EXIT_SIGINT
