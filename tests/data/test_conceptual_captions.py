"""The URL-list builder on local data with Conceptual Captions' columns; offline Hub failure."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli import UserError
from data.conceptual_captions import build_url_parquet, main

KEEP = [
    ("http://a.example/1.jpg", "a dog runs on the beach"),
    ("https://b.example/2.jpg", "  a red car parked outside  "),
    ("HTTPS://c.example/3.png", "people at a market stall"),
    ("http://d.example/4.jpg", "an old bridge over a river"),
    ("http://e.example/5.jpg", "a cat asleep on a sofa"),
]
DROP = [
    ("ftp://f.example/6.jpg", "a caption that is long enough"),  # scheme
    ("data:image/png;base64,AAAA", "an inline image caption"),  # scheme
    ("http://a.example/1.jpg", "the same url a second time"),  # duplicate
    ("http://g.example/7.jpg", "too short"),  # 9 characters
    ("http://h.example/8.jpg", "x" * 300),  # too long
    ("http://i.example/9.jpg", None),  # no caption
]


@pytest.fixture
def local_parquet(tmp_path: Path) -> Path:
    rows = KEEP[:2] + DROP[:3] + KEEP[2:] + DROP[3:]
    path = tmp_path / "cc.parquet"
    columns = {"image_url": [u for u, _ in rows], "caption": [c for _, c in rows], "extra": list(range(len(rows)))}
    pq.write_table(pa.table(columns), path)
    return path


def test_filters_and_samples_a_local_parquet(local_parquet: Path, tmp_path: Path) -> None:
    stats = build_url_parquet(tmp_path / "all.parquet", source=str(local_parquet), num_samples=100)
    written = pq.read_table(tmp_path / "all.parquet")
    assert written.column_names == ["image_url", "caption"]
    assert sorted(zip(*written.to_pydict().values())) == sorted((u, c.strip()) for u, c in KEEP)
    assert {k: stats[k] for k in ("rows_read", "caption_too_short", "caption_too_long", "url_not_http", "duplicate_url",
                                  "rows_written")} == {
        "rows_read": 11, "caption_too_short": 2, "caption_too_long": 1, "url_not_http": 2, "duplicate_url": 1,
        "rows_written": 5,
    }


def test_sample_is_deterministic_and_nested(local_parquet: Path, tmp_path: Path) -> None:
    def sample(name: str, n: int, seed: int) -> list[str]:
        build_url_parquet(tmp_path / name, source=str(local_parquet), num_samples=n, seed=seed)
        return pq.read_table(tmp_path / name)["image_url"].to_pylist()

    three = sample("a.parquet", 3, seed=0)
    assert len(three) == 3 and sample("b.parquet", 3, seed=0) == three
    assert sample("c.parquet", 4, seed=0)[:3] == three  # a bigger sample extends a smaller one
    assert any(sample(f"s{seed}.parquet", 3, seed=seed) != three for seed in (1, 2, 3))


def test_reads_a_saved_dataset_folder(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"image_url": [u for u, _ in KEEP], "caption": [c for _, c in KEEP]}).save_to_disk(
        str(tmp_path / "saved")
    )
    stats = build_url_parquet(tmp_path / "out.parquet", source=str(tmp_path / "saved"), num_samples=2)
    assert stats["rows_written"] == len(pq.read_table(tmp_path / "out.parquet")) == 2


def test_missing_column_is_named(local_parquet: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"column 'url' not found; columns are: image_url, caption, extra"):
        build_url_parquet(tmp_path / "out.parquet", source=str(local_parquet), url_column="url")


def test_offline_hub_fails_with_advice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail fast, never touch the network
    with pytest.raises(UserError, match=r"could not load 'google-research-datasets/conceptual_captions'.*local"):
        build_url_parquet(tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--output", "--source", "--num-samples", "--seed", "--min-caption-chars", "--max-caption-chars"):
        assert option in text
