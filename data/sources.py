"""Open a `datasets` source by name or path, with one clear error when the Hub cannot be reached."""

from __future__ import annotations

import os
from typing import Any

import datasets
from datasets import Dataset, IterableDataset

_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
_SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def pick_split(loaded: Any, split: str | None, source: str) -> Dataset | IterableDataset:
    """One split of what `load_dataset`/`load_from_disk` returned; None takes the only one, or "train"."""
    if isinstance(loaded, (Dataset, IterableDataset)):
        return loaded
    names = list(loaded.keys())
    if split is None and len(names) == 1:
        return loaded[names[0]]
    if (split or "train") in names:
        return loaded[split or "train"]
    raise ValueError(f"{source} has the splits {names}; pass split= one of them")


def open_dataset(
    source: str, *, split: str | None = None, streaming: bool = False, config_name: str | None = None
) -> Dataset | IterableDataset:
    """Open a `save_to_disk` folder, a data folder or file (parquet/csv/tsv/json), or a Hub dataset."""
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, marker)) for marker in _SAVE_TO_DISK_MARKERS):
            chosen = pick_split(datasets.load_from_disk(source), split, source)
            return chosen.to_iterable_dataset() if streaming and isinstance(chosen, Dataset) else chosen
        return pick_split(datasets.load_dataset(source, config_name, streaming=streaming), split, source)
    if os.path.isfile(source):
        extension = os.path.splitext(source)[1].lower()
        if extension not in _FILE_BUILDERS:
            raise ValueError(f"cannot read {source}: expected one of {', '.join(_FILE_BUILDERS)} or a folder")
        kwargs = {"sep": "\t"} if extension == ".tsv" else {}
        loaded = datasets.load_dataset(_FILE_BUILDERS[extension], data_files=source, streaming=streaming, **kwargs)
        return pick_split(loaded, split, source)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"{source} does not exist (and it is not a Hub dataset name like 'org/name')")
    try:
        loaded = datasets.load_dataset(source, config_name, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - network, auth and not-found errors all need the same advice
        raise RuntimeError(
            f"could not load {source!r} (config {config_name!r}) from the Hugging Face Hub, and there is no local "
            f"file or folder of that name: {type(err).__name__}: {err}. If this machine is offline, load it on a "
            "connected one and copy it here (save_to_disk, or the "
            "dataset's parquet files), then pass that local folder or file instead; if online, check the name, "
            "config and your access rights"
        ) from err
    return pick_split(loaded, split, source)
