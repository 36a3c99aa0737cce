"""Keeping a command's stdout for its results only (the benchmarks print JSON lines there)."""

import contextlib
import os
import sys


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends file descriptor 1 to stderr while the work runs: libraries write there too (the tokenizers library's
    progress, DeepSpeed's "Setting accelerator to CPU" when it is installed), and stdout is results."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
