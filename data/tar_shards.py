"""Find webdataset tar shards and read their samples, treating damaged shards as data, not crashes.

`datasets`' own webdataset builder stops the whole load at the first damaged tar, non-UTF-8 caption
or unreadable JSON, and guesses the schema from five samples. Here a tar is read as raw bytes per
sample (`<key>.<ext>` members grouped by key), so every decision about a bad sample is made in one
place (`data.loading`), where it is counted.
"""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec

from cli import UserError

SHARD_MISSING = "shard missing"
SHARD_EMPTY = "shard empty (no samples)"
SHARD_DAMAGED = "shard truncated or corrupt (samples after the damage are lost)"

# Errors a damaged or non-tar file raises while being read.
TAR_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)

_GLOB_CHARS = set("*?[")
# As webdataset: the key is the path up to the first dot of the file name, the rest is the field.
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass(frozen=True)
class ShardRef:
    """One shard to read. `size` and `mtime` (-1 when missing) make a changed file a new cache entry."""

    path: str
    key_prefix: str
    size: int
    mtime: float


def is_tar_path(path: str) -> bool:
    """True for the file names webdataset shards have."""
    return path.endswith((".tar", ".tar.gz", ".tgz"))


def _expand(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    if _GLOB_CHARS & set(pattern):
        return sorted(p for p in fs.glob(pattern) if is_tar_path(p))
    if fs.isdir(pattern):
        return sorted(p for p in fs.ls(pattern, detail=False) if is_tar_path(p))
    return [pattern]


def shard_folder(source: str, split: str | None) -> str | None:
    """The folder of tars for `split` inside `source`, or None when `source` holds no shards.

    `source/<split>/*.tar` (the generator's layout) wins; tars directly in `source` (img2dataset's
    layout: one folder per download) are the one split there is, whatever `split` names.
    """
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.isdir(root):
        return None
    if split is not None and fs.isdir(posixpath.join(root, split)) and _expand(fs, posixpath.join(root, split)):
        return posixpath.join(root, split)
    if _expand(fs, root):
        return root
    split_folders = sorted(
        posixpath.basename(p) for p in fs.ls(root, detail=False) if fs.isdir(p) and _expand(fs, p)
    )
    if split_folders:
        raise UserError(
            f"{source} holds shards in the split folders {split_folders}"
            + (f" but none named {split!r}" if split else "")
            + f"; give the folder you mean, e.g. {posixpath.join(source, split_folders[0])}"
        )
    return None


def list_shards(paths: Sequence[str]) -> list[ShardRef]:
    """Expand folders and glob patterns into sorted, de-duplicated shard references.

    Explicitly named files that do not exist are kept (size -1) so that loading counts them as
    missing instead of silently loading less. Keys get the parent folder as prefix when shards
    come from several folders (each img2dataset run numbers its samples from zero).
    """
    found: list[tuple[fsspec.AbstractFileSystem, str]] = []
    for path in paths:
        fs, local = fsspec.core.url_to_fs(os.fspath(path))
        found.extend((fs, p) for p in _expand(fs, local))
    unique = {p: fs for fs, p in found}
    if not unique:
        raise UserError(f"no .tar shards found in {', '.join(map(str, paths))}; check the path or pattern")
    parents = {posixpath.dirname(p) for p in unique}
    common = posixpath.commonpath(parents) if len(parents) > 1 else None
    refs = []
    for path in sorted(unique):
        fs = unique[path]
        try:
            info = fs.info(path)
            size, mtime = int(info.get("size") or 0), float(info.get("mtime") or info.get("created") or 0)
        except FileNotFoundError:
            size, mtime = -1, -1.0
        prefix = posixpath.relpath(posixpath.dirname(path), common) + "/" if common is not None else ""
        refs.append(ShardRef(fs.unstrip_protocol(path), prefix, size, mtime))
    return refs


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample, in file order.

    Raises one of `TAR_READ_ERRORS` where the file is damaged; samples before that point have been
    yielded, the sample being read is not.
    """
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, files = None, {}
        for member in tar:
            match = _MEMBER_RE.match(member.name) if member.isfile() else None
            if match is None:
                continue
            base, extension = match.group(1).removeprefix("./"), match.group(2).lower()
            if base != key or extension in files:
                if key is not None:
                    yield key, files  # complete before this member is read, which may fail
                key, files = base, {}
            extracted = tar.extractfile(member)
            files[extension] = extracted.read() if extracted is not None else b""
        if key is not None:
            yield key, files
