"""Streaming 20,000 samples writes nothing into the `datasets` cache and keeps resident memory flat, where the
map-style loader copies every image into it first (checked on one of the twenty shards, the same cache setting)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data.synthetic import generate_dataset
from tests.helpers import REPO

COPIES = 20  # 20 folders x one 1,000-sample shard: keys are unique (each folder prefixes its own)

READ_STREAM = textwrap.dedent("""
    import json, resource, sys
    from data.streaming import ShardStream
    stream = ShardStream.from_source(sys.argv[1], seed=0, buffer_size=1000)
    rss, count = {}, 0
    for row in stream:
        count += 1
        if count in (2000, 20000):
            rss[count] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if row["stream_state"]["epoch"] > 0 or count == 20000:
            break
    print(json.dumps({"samples": count, "peak_rss_mb": rss}))
""")

LOAD_MAP_STYLE = textwrap.dedent("""
    import sys
    from data.loading import load_image_text_dataset
    print(len(load_image_text_dataset(sys.argv[1], split="train")))
""")


# Slow tier (`make test`, not `make test-fast`): streams 20,000 samples in a child process.
pytestmark = pytest.mark.slow


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def twenty_thousand(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("20k")
    generate_dataset(root / "one", {"train": 1000}, seed=7, image_size=32, samples_per_shard=1000, num_proc=1)
    [shard] = (root / "one" / "train").glob("*.tar")
    for i in range(COPIES):
        (root / "shards" / f"part{i:02d}").mkdir(parents=True)
        shutil.copy(shard, root / "shards" / f"part{i:02d}" / shard.name)
    return str(root / "shards" / "*" / "*.tar")


def run_python(code: str, source: str, cache: Path) -> str:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, source], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_streaming_20k_samples_writes_no_cache_and_keeps_memory_flat(twenty_thousand, tmp_path):
    stream_cache = tmp_path / "stream_cache"
    result = json.loads(run_python(READ_STREAM, twenty_thousand, stream_cache))
    written = folder_bytes(stream_cache) if stream_cache.exists() else 0
    shards = sum(p.stat().st_size for p in Path(twenty_thousand.split("*")[0]).rglob("*.tar"))

    map_cache = tmp_path / "map_cache"
    one_shard = twenty_thousand.replace("*/*.tar", "part00")
    assert run_python(LOAD_MAP_STYLE, one_shard, map_cache) == "1000"
    copied = folder_bytes(map_cache)
    rss = {int(k): v for k, v in result["peak_rss_mb"].items()}
    print(f"\nshards {shards / 1e6:.1f} MB; streaming 20k samples wrote {written} bytes to the datasets cache, "
          f"peak RSS {rss[2000]:.0f} MB after 2k samples and {rss[20000]:.0f} MB after 20k; map-style loading of "
          f"one 1,000-sample shard wrote {copied / 1e6:.1f} MB")
    assert result["samples"] == COPIES * 1000
    assert written < 100_000  # nothing image-sized: the images alone are ~shards bytes
    assert copied > 1000 * 1000  # the contrast: the map-style loader copies the images, over 1 KB per sample
    assert rss[20000] - rss[2000] < 50  # flat: reading 10x more samples adds no memory to speak of
