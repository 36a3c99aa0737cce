"""Telling a local path from a Hub name, and saying which local path was meant when one is missing.

Options such as `--train_data` or `--qformer_name_or_path` take a local path or a name on the Hugging Face Hub
("org/name"). A local path with a typo also has the form "folder/name"; sent to the Hub it fails with a message
about repository names, or about the network, that points the wrong way. A value is taken as a local path when it
can only be one, and then a missing path is reported as such, with the nearest existing name.
"""

import difflib
import os
from pathlib import Path

from .errors import UserError

# Files a data or model option may name directly; a Hub name never ends like this.
_FILE_SUFFIXES = (".tar", ".tgz", ".gz", ".parquet", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml",
                  ".safetensors", ".arrow")


def looks_like_local_path(value: str) -> bool:
    """True when `value` can only mean a local path.

    It exists; or starts with `.`, `/` or `~`; or holds a backslash, more than one slash or a glob character; or
    ends like a data or weights file; or its first component is an existing folder here (`outputs/typo`).
    """
    if os.path.exists(value) or value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1:
        return True
    if any(ch in value for ch in "*?[") or value.lower().endswith(_FILE_SUFFIXES):
        return True
    first, _, rest = value.partition("/")
    return bool(rest) and os.path.isdir(first)


def did_you_mean(path: str | os.PathLike) -> str:
    """` (did you mean X?)` with the existing sibling nearest to `path`'s name, or an empty string."""
    path = Path(os.path.expanduser(os.fspath(path)))
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        path, parent = parent, parent.parent
    if not parent.is_dir():
        return ""
    names = [p.name for p in parent.iterdir()]
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / match[0]}?)" if match else ""


def missing_path(option: str, value: str, expected: str) -> UserError:
    """The error for a local path that does not exist: `--train_data outputs/dmeo: no such file or folder ...`."""
    return UserError(f"{option} {value}: no such file or folder{did_you_mean(value)}; expected {expected}")


__all__ = ["did_you_mean", "looks_like_local_path", "missing_path"]
