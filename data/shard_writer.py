"""Write shards in exactly the layout img2dataset's webdataset output uses.

Per shard NNNNN: `NNNNN.tar` (one `<key>.<ext>` member per file of a sample, written by the same
`webdataset.TarWriter` img2dataset uses), `NNNNN.parquet` (one metadata row per sample) and
`NNNNN_stats.json` (counts and timings). Anything that reads img2dataset output reads ours.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset

OOM_SHARD_COUNT = 5  # img2dataset's default: shard names have 5 digits


def shard_name(shard_id: int) -> str:
    """'00042' for shard 42, as img2dataset names them."""
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def sample_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's sample key: the shard id followed by the zero-padded index inside the shard."""
    digits = math.ceil(math.log10(samples_per_shard))
    return f"{shard_id * 10**digits + index:0{digits + OOM_SHARD_COUNT}d}"


class ShardWriter:
    """Writes one shard (tar + parquet + stats) into `folder`.

    `parquet_schema` fixes the parquet columns; each sample's `record` gives their values.
    Tar members carry a fixed modification time, so the same samples give the same bytes.
    """

    def __init__(self, folder: str | os.PathLike, shard_id: int, parquet_schema: pa.Schema) -> None:
        self.folder = os.fspath(folder)
        self.shard_id = shard_id
        self.schema = parquet_schema
        self.records: list[dict[str, Any]] = []
        self.start_time = time.time()
        self._tar_file = open(os.path.join(self.folder, f"{shard_name(shard_id)}.tar"), "wb")
        self._tar = webdataset.TarWriter(self._tar_file, encoder=False, mtime=0)

    def write(self, key: str, files: dict[str, bytes], record: dict[str, Any]) -> None:
        """Add one sample: `files` maps extension ('jpg', 'txt', 'json') to the member's bytes."""
        self._tar.write({"__key__": key, **files})
        self.records.append(record)

    def close(self) -> None:
        """Finish the tar and write the parquet and stats files."""
        self._tar.close()
        self._tar_file.close()
        name = shard_name(self.shard_id)
        table = pa.Table.from_pylist(self.records, schema=self.schema)
        pq.write_table(table, os.path.join(self.folder, f"{name}.parquet"))
        end_time = time.time()
        stats = {
            "count": len(self.records),
            "successes": len(self.records),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": end_time - self.start_time,
            "start_time": self.start_time,
            "end_time": end_time,
            "status_dict": {"success": len(self.records)} if self.records else {},
        }
        with open(os.path.join(self.folder, f"{name}_stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=4)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
