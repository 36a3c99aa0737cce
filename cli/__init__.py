"""What every command line shares: one-line errors for a user's mistakes, argparse parsers that raise them,
telling local paths from Hub names, and a stdout kept for results.

No other package of this project is imported here, so every package can use it.
"""

from .arguments import (
    ArgumentParser,
    OneLineErrors,
    check_at_least,
    closest,
    count,
    non_negative_int,
    positive_int,
    unknown_flags_message,
)
from .errors import DEBUG_VARIABLE, UserError, one_line, run_command
from .paths import did_you_mean, looks_like_local_path, missing_path
from .streams import stdout_to_stderr

__all__ = [
    "DEBUG_VARIABLE", "ArgumentParser", "OneLineErrors", "UserError", "check_at_least", "closest", "count",
    "did_you_mean", "looks_like_local_path", "missing_path", "non_negative_int", "one_line", "positive_int",
    "run_command", "stdout_to_stderr", "unknown_flags_message",
]
