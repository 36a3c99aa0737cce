"""img2dataset for real against a loopback server: shard contents and failure counts by reason."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli import UserError
from data.download import SUMMARY_RELATIVE_PATH, download_images, main, summarize_download

from .conftest import EXPECTED_FAILURES, EXTRA_COLUMNS, read_tar

# Slow tier (`make test`, not `make test-fast`): runs img2dataset.
pytestmark = pytest.mark.slow


def test_failure_counts_by_reason(img2dataset_run: dict) -> None:
    summary = img2dataset_run["summary"]
    good = len(img2dataset_run["good_urls"])
    assert summary["count"] == len(img2dataset_run["rows"]) == good + sum(EXPECTED_FAILURES.values())
    assert summary["successes"] == good
    assert summary["failures_by_reason"] == EXPECTED_FAILURES
    assert summary["failed_to_download"] == 4  # two 404s, the refused connection, the X-Robots-Tag opt-out
    assert summary["failed_to_resize"] == 3  # two undecodable bodies, the oversize image
    assert summary["unfinished_shards"] == []
    saved = json.loads((img2dataset_run["output"] / SUMMARY_RELATIVE_PATH).read_text())
    assert saved == summary


def test_shard_contents(img2dataset_run: dict) -> None:
    output = img2dataset_run["output"]
    captions = {row["image_url"]: row["caption"] for row in img2dataset_run["rows"]}
    in_tars = {}
    for tar in sorted(output.glob("*.tar")):
        for key, files in read_tar(tar).items():
            assert set(files) == {"jpg", "txt", "json"}, key
            meta = json.loads(files["json"])
            assert meta["key"] == key and meta["status"] == "success"
            assert files["txt"].decode() == captions[meta["url"]]  # img2dataset renames image_url to url
            assert Image.open(io.BytesIO(files["jpg"])).size == (64, 64)
            in_tars[meta["url"]] = key
    assert set(in_tars) == img2dataset_run["good_urls"]
    # Failures are only in the per-shard parquet files, with their status and message.
    rows = [row for path in sorted(output.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert len(rows) == len(captions)
    failed = [row for row in rows if row["status"] != "success"]
    assert {row["url"] for row in failed} == set(captions) - img2dataset_run["good_urls"]
    assert len(list(output.glob("*_stats.json"))) == len(list(output.glob("*.tar"))) == 2


def test_overwrite_mode_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="overwrite"):
        download_images(tmp_path / "urls.parquet", tmp_path / "out", incremental_mode="overwrite")


def test_missing_url_list_says_how_to_build_one(tmp_path) -> None:
    with pytest.raises(UserError, match="data.conceptual_captions"):
        download_images(tmp_path / "nothing.parquet", tmp_path / "out")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--url-list", "--output-folder", "--image-size", "--processes", "--threads", "center_crop",
                   "--distributor", "--spark-master", "pip install pyspark", "pip install ray"):
        assert option in text


def _samples(output: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """{shard: {key: {extension: bytes}}} of every shard in `output`."""
    return {tar.name: read_tar(tar) for tar in sorted(output.glob("*.tar"))}


@pytest.mark.skipif(
    importlib.util.find_spec("pyspark") is None, reason="pyspark is not installed (pip install pyspark; Java 17+)"
)
def test_pyspark_distributor_gets_the_same_samples(
    img2dataset_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same URLs through Spark in local mode (two workers, output given as a file:// URL) as through processes."""
    # A JVM that lives seconds: its quick compiler only, half the CPU time of Spark's start-up.
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--driver-java-options -XX:TieredStopAtLevel=1 pyspark-shell")
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(img2dataset_run["rows"]), url_list)
    output = tmp_path / "spark_shards"
    summary = download_images(  # the settings of img2dataset_run
        url_list, output.as_uri(), image_size=64, thread_count=4, number_sample_per_shard=10, timeout=5,
        max_image_area=300_000, save_additional_columns=EXTRA_COLUMNS, distributor="pyspark", spark_master="local[2]",
    )
    expected = _samples(img2dataset_run["output"])
    assert sum(len(shard) for shard in expected.values()) == len(img2dataset_run["good_urls"])
    assert _samples(output) == expected  # keys, captions, metadata and image bytes
    assert summary == {**img2dataset_run["summary"], "output_folder": output.as_uri()}
    assert json.loads((output / SUMMARY_RELATIVE_PATH).read_text()) == summary


def test_summary_of_a_remote_folder(img2dataset_run: dict) -> None:
    """Shards on storage that fsspec reaches by URL (memory:// here, s3:// or hdfs:// on a cluster)."""
    memory = fsspec.filesystem("memory")
    for path in img2dataset_run["output"].iterdir():
        if path.is_file():
            memory.pipe(f"/remote_shards/{path.name}", path.read_bytes())
    try:
        summary = summarize_download("memory://remote_shards")
        assert summary == {**img2dataset_run["summary"], "output_folder": "memory://remote_shards"}
        assert json.loads(memory.cat(f"/remote_shards/{SUMMARY_RELATIVE_PATH}")) == summary
    finally:
        memory.rm("/remote_shards", recursive=True)


@pytest.fixture
def url_list(tmp_path: Path) -> Path:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist([{"image_url": "http://127.0.0.1:9/a.jpg", "caption": "a"}]), path)
    return path


@pytest.mark.parametrize("package", ["pyspark", "ray"])
def test_missing_distributor_package_says_what_to_install(
    package: str, url_list: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry makes Python's import fail as for a package that is not installed (ray is not in the venv;
    # pyspark may be). Without the check, img2dataset's ray distributor would silently download nothing.
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setitem(sys.modules, f"{package}.sql", None)
    with pytest.raises(UserError, match=f"pip install {package}"):
        download_images(url_list, tmp_path / "out", distributor=package)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("pyspark") is None, reason="pyspark is not installed")
def test_pyspark_without_java_says_so(url_list: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    message = f"Spark needs Java 17 or newer and finds none (JAVA_HOME={tmp_path / 'jdk'} has no bin/java)"
    with pytest.raises(UserError, match=re.escape(message)):
        download_images(url_list, tmp_path / "out", distributor="pyspark")


def test_unknown_distributor_is_refused(url_list: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'dask' is not one of img2dataset's: multiprocessing, pyspark, ray"):
        download_images(url_list, tmp_path / "out", distributor="dask")
    with pytest.raises(UserError, match="--distributor: invalid choice: 'dask'"):
        main(["--url-list", str(url_list), "--output-folder", str(tmp_path / "out"), "--distributor", "dask"])


def test_spark_master_needs_the_pyspark_distributor(url_list: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Spark master 'spark://head:7077' is only used by the pyspark distributor"):
        main(["--url-list", str(url_list), "--output-folder", str(tmp_path / "out"), "--spark-master",
              "spark://head:7077"])
