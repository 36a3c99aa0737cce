"""img2dataset for real against a loopback server: shard contents and failure counts by reason."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli import UserError
from data.download import SUMMARY_RELATIVE_PATH, download_images, main

from .conftest import EXPECTED_FAILURES, read_tar


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
    for option in ("--url-list", "--output-folder", "--image-size", "--processes", "--threads", "center_crop"):
        assert option in text
