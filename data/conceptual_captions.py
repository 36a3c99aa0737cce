"""Build the URL list for img2dataset from Conceptual Captions (or any table of image URLs and captions).

The original recipe: ~200k pairs from `google-research-datasets/conceptual_captions` (config
`unlabeled`: columns image_url, caption; 3.3M train rows), fetched by img2dataset at 224 px. Here:

1. read the source (the Hub dataset, or a local parquet/csv/tsv/json file or datasets folder with
   the same columns);
2. drop rows with a caption outside the length bounds (after trimming), a URL that is not
   http(s), or a URL seen before (the first row with a URL wins);
3. keep `num_samples` rows chosen by a seeded hash of the URL: the same seed picks the same rows
   whatever the row order of the source, and a larger sample contains a smaller one;
4. write a parquet with the columns image_url and caption, in that hashed (shuffled) order.

    python -m data.conceptual_captions --output data/cc_200k.parquet --num-samples 200000
"""

from __future__ import annotations

import logging
import os
from argparse import RawDescriptionHelpFormatter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cli import ArgumentParser, UserError, non_negative_int, positive_int, run_command

from .hashing import seeded_hash
from .sources import open_dataset

logger = logging.getLogger(__name__)

HUB_DATASET = "google-research-datasets/conceptual_captions"
HUB_CONFIG = "unlabeled"


def _require_columns(names: Sequence[str], *columns: str) -> None:
    for column in columns:
        if column not in names:
            raise UserError(
                f"column {column!r} not found; columns are: {', '.join(names)} (set --url-column / --caption-column)"
            )


def filter_and_sample(
    table: pa.Table,
    *,
    num_samples: int,
    seed: int = 0,
    min_caption_chars: int = 10,
    max_caption_chars: int = 256,
    url_column: str = "image_url",
    caption_column: str = "caption",
) -> tuple[pa.Table, dict[str, int]]:
    """Filter and sample a table; return (image_url/caption table, counts of what each step removed)."""
    _require_columns(table.column_names, url_column, caption_column)
    urls = pc.utf8_trim_whitespace(table[url_column].cast(pa.string()))
    captions = pc.utf8_trim_whitespace(table[caption_column].cast(pa.string()))
    stats = {"rows_read": len(table)}
    lengths = pc.fill_null(pc.utf8_length(captions), 0)
    too_short = pc.less(lengths, min_caption_chars)
    too_long = pc.greater(lengths, max_caption_chars)
    lowered = pc.utf8_lower(pc.fill_null(urls, ""))
    web_url = pc.or_(pc.starts_with(lowered, "http://"), pc.starts_with(lowered, "https://"))
    stats["caption_too_short"] = pc.sum(too_short).as_py() or 0
    stats["caption_too_long"] = pc.sum(too_long).as_py() or 0
    good_caption = pc.invert(pc.or_(too_short, too_long))
    stats["url_not_http"] = pc.sum(pc.and_(good_caption, pc.invert(web_url))).as_py() or 0
    kept = pa.table({"image_url": urls, "caption": captions}).filter(pc.and_(good_caption, web_url))
    # First occurrence of each URL wins: index of the first row per URL, in the original order.
    indexed = kept.append_column("row", pa.array(np.arange(len(kept))))
    first_rows = indexed.group_by("image_url", use_threads=False).aggregate([("row", "min")])["row_min"]
    kept = kept.take(pa.array(np.sort(first_rows.to_numpy())))
    stats["duplicate_url"] = len(indexed) - len(kept)
    stats["rows_after_filters"] = len(kept)
    ranks = np.fromiter(
        (seeded_hash(url, seed) for url in tqdm(kept["image_url"].to_pylist(), desc="ranking urls", unit="url")),
        dtype=np.uint64, count=len(kept),
    )
    order = np.argsort(ranks, kind="stable")[:num_samples]
    sample = kept.take(pa.array(order))
    stats["rows_written"] = len(sample)
    if len(sample) < num_samples:
        logger.warning("only %d rows pass the filters; asked for %d", len(sample), num_samples)
    return sample, stats


def build_url_parquet(
    output: str | os.PathLike,
    *,
    source: str = HUB_DATASET,
    config_name: str | None = HUB_CONFIG,
    split: str = "train",
    num_samples: int = 200_000,
    seed: int = 0,
    min_caption_chars: int = 10,
    max_caption_chars: int = 256,
    url_column: str = "image_url",
    caption_column: str = "caption",
) -> dict[str, Any]:
    """Read `source`, filter, sample and write `output` (parquet); return the counts.

    `source` is a Hub dataset name (needs the Hub; offline it fails with advice) or a local file
    or folder. `config_name` applies to Hub datasets only.
    """
    is_local = os.path.exists(source)
    dataset = open_dataset(source, split=split, config_name=None if is_local else config_name)
    _require_columns(dataset.column_names, url_column, caption_column)
    table = dataset.select_columns([url_column, caption_column]).with_format("arrow")[:]
    sample, stats = filter_and_sample(
        table, num_samples=num_samples, seed=seed, min_caption_chars=min_caption_chars,
        max_caption_chars=max_caption_chars, url_column=url_column, caption_column=caption_column,
    )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    pq.write_table(sample, output)
    logger.info("wrote %d rows to %s", len(sample), output)
    return {"source": source, "output": os.fspath(output), "seed": seed, **stats}


def _parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(
        prog="python -m data.conceptual_captions",
        description=(
            "Step 1 of the real-data recipe: make the image URL list that `python -m data.download` fetches. "
            "Reads Conceptual Captions from the Hugging Face Hub (or a local copy), drops rows with captions "
            "outside the length bounds, non-http(s) URLs and repeated URLs, keeps a seeded sample, and writes "
            "a parquet with the columns image_url and caption."
        ),
        epilog=(
            "examples:\n"
            "  python -m data.conceptual_captions --output data/cc_200k.parquet\n"
            "  python -m data.conceptual_captions --source ./cc_unlabeled_parquet/ --output data/cc_10k.parquet "
            "--num-samples 10000\n"
            "Offline? Run the first form on a connected machine and copy the parquet, or copy the dataset's "
            "parquet files and pass them with --source."
        ),
        formatter_class=RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="parquet file to write")
    parser.add_argument(
        "--source", default=HUB_DATASET, help=f"Hub dataset or local file/folder (default {HUB_DATASET})"
    )
    parser.add_argument("--config", default=HUB_CONFIG, help=f"Hub configuration (default {HUB_CONFIG})")
    parser.add_argument("--split", default="train", help="split to read (default train)")
    parser.add_argument("--num-samples", type=positive_int, default=200_000, help="rows to keep (default 200000)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--min-caption-chars", type=non_negative_int, default=10,
                        help="shortest caption kept (default 10)")
    parser.add_argument("--max-caption-chars", type=positive_int, default=256,
                        help="longest caption kept (default 256)")
    parser.add_argument("--url-column", default="image_url", help="column with the URLs (default image_url)")
    parser.add_argument("--caption-column", default="caption", help="column with the captions (default caption)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = build_url_parquet(
        args.output, source=args.source, config_name=args.config, split=args.split, num_samples=args.num_samples,
        seed=args.seed, min_caption_chars=args.min_caption_chars, max_caption_chars=args.max_caption_chars,
        url_column=args.url_column, caption_column=args.caption_column,
    )
    for name, value in stats.items():
        print(f"{name}: {value}")
    print(f"next: python -m data.download --url-list {args.output} --output-folder <folder for the shards>")


if __name__ == "__main__":
    run_command(main)
