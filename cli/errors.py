"""A user's mistake ends a command as one line on stderr; a bug still shows its traceback.

Every command (`python -m training.train_qformer`, `python -m eval`, `python -m data.synthetic`, `python -m demo`,
...) runs its `main` through `run_command`. What counts as the user's mistake: a `UserError` (raised where a bad
value is detected, with a message that names it and says what to do instead) and the operating system's own
"no such file" kind of errors, which always name the path. Anything else is ours to fix and keeps its traceback.
`QFORMER_VLM_DEBUG=1` shows the traceback of user errors too.
"""

import os
import sys
from collections.abc import Callable

DEBUG_VARIABLE = "QFORMER_VLM_DEBUG"
# Exit status of a refused command line, as argparse uses.
USAGE_ERROR = 2
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(ValueError):
    """A bad value from the user: the message names it and says what to do instead.

    A `ValueError`, so code that calls the library (not a command line) handles it as before.
    """


def one_line(message: str) -> str:
    """`message` with its line breaks folded into "; ", so an error is always a single line."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _message(err: Exception) -> str:
    # The operating system's errors read "[Errno 2] No such file or directory: 'x'"; without the number they read
    # as a sentence. Ours carry their own message.
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return str(err)


def run_command(main: Callable[[], object]) -> None:
    """Runs a command's `main()`: a user's mistake becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except (UserError, *PATH_ERRORS) as err:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"error: {one_line(_message(err))}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


__all__ = ["DEBUG_VARIABLE", "PATH_ERRORS", "USAGE_ERROR", "UserError", "one_line", "run_command"]
