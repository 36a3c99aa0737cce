"""Open a `datasets` source by name or path, with one clear error for what cannot be read."""

from __future__ import annotations

import os
from typing import Any

import datasets
import pyarrow.parquet
from datasets import Dataset, IterableDataset

from cli import UserError, looks_like_local_path, missing_path, one_line

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# What a data option accepts, for the messages.
EXPECTED = (
    "a folder of .tar shards, an image folder with metadata.jsonl/csv, a save_to_disk folder, a "
    f"{'/'.join(_FILE_BUILDERS)} file or a Hub dataset name"
)


def pick_split(loaded: Any, split: str | None, source: str) -> Dataset | IterableDataset:
    """One split of what `load_dataset`/`load_from_disk` returned; None takes "train". A source of one split is that
    split whatever the name (a parquet or JSON file is all "train" to `datasets`, and given as evaluation data it is
    the evaluation split), as a folder of shards is."""
    if isinstance(loaded, (Dataset, IterableDataset)):
        return loaded
    names = list(loaded.keys())
    if len(names) == 1:
        return loaded[names[0]]
    if (split or "train") in names:
        return loaded[split or "train"]
    raise UserError(f"{source} has no split {split or 'train'!r}; its splits are {names}")


def _read_local(source: str, read) -> Any:
    """`read()` for a local source; anything it raises means the files cannot be read as a dataset."""
    try:
        return read()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file makes datasets raise many types
        raise UserError(
            f"cannot read {source} as a dataset ({type(err).__name__}: {one_line(err)[:300]}); expected {EXPECTED}"
        ) from err


def open_dataset(
    source: str, *, split: str | None = None, streaming: bool = False, config_name: str | None = None
) -> Dataset | IterableDataset:
    """Open a `save_to_disk` folder, a data folder or file (parquet/csv/tsv/json), or a Hub dataset."""
    if os.path.isdir(source):
        if not os.listdir(source):
            raise UserError(f"data folder {source} is empty; expected {EXPECTED}")
        if any(os.path.exists(os.path.join(source, marker)) for marker in _SAVE_TO_DISK_MARKERS):
            chosen = pick_split(_read_local(source, lambda: datasets.load_from_disk(source)), split, source)
            return chosen.to_iterable_dataset() if streaming and isinstance(chosen, Dataset) else chosen
        loaded = _read_local(source, lambda: datasets.load_dataset(source, config_name, streaming=streaming))
        return pick_split(loaded, split, source)
    if os.path.isfile(source):
        extension = os.path.splitext(source)[1].lower()
        if extension not in _FILE_BUILDERS:
            raise UserError(f"cannot read {source}: expected {EXPECTED}")
        kwargs = {"sep": "\t"} if extension == ".tsv" else {}
        builder = _FILE_BUILDERS[extension]
        if builder == "parquet":  # its footer, read first: datasets would log the failure before raising it
            _read_local(source, lambda: pyarrow.parquet.read_schema(source))
        loaded = _read_local(
            source, lambda: datasets.load_dataset(builder, data_files=source, streaming=streaming, **kwargs)
        )
        return pick_split(loaded, split, source)
    if looks_like_local_path(source):
        raise missing_path("data source", source, EXPECTED)
    try:
        loaded = datasets.load_dataset(source, config_name, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - network, auth and not-found errors all need the same advice
        raise UserError(
            f"could not load {source!r} (config {config_name!r}) from the Hugging Face Hub, and there is no local "
            f"file or folder of that name ({type(err).__name__}: {one_line(err)[:300]}); if this machine is offline "
            "(or HF_HUB_OFFLINE is set), load it on a connected one and copy it here (save_to_disk, or the "
            "dataset's parquet files), then pass that local folder or file instead; if online, check the name, "
            "config and your access rights"
        ) from err
    return pick_split(loaded, split, source)
