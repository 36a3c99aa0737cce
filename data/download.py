"""Fetch the images of a URL list with img2dataset, then summarise what came and what failed, by reason.

Defaults are the original recipe's: 224 px, center crop, webdataset output, a parquet input with the
columns image_url and caption, 16 processes x 64 threads. Output: `NNNNN.tar` (.jpg/.txt/.json per
image), `NNNNN.parquet` (one row per URL, failures included, with `status` and `error_message`) and
`NNNNN_stats.json` per shard; `load_image_text_dataset(output_folder)` reads it.

Running it again on the same output folder resumes: finished shards are kept (img2dataset's
"incremental" mode). img2dataset's "overwrite" mode is not offered: it deletes its own temporary
folder and then hangs. Servers that send `X-Robots-Tag: noai` (or noimageai/noindex/noimageindex)
are respected; those images are counted as failures with that reason.

At scale, img2dataset's own distributors spread the shards: `--distributor pyspark` over a Spark cluster
(`--spark-master spark://...`), `--distributor ray` over a Ray cluster, with the output folder on storage
every worker reaches (a shared mount, or an fsspec URL such as s3://...).

    python -m data.download --url-list data/cc_200k.parquet --output-folder data/cc_images
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import sys
from argparse import RawDescriptionHelpFormatter
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow.parquet as pq

from cli import ArgumentParser, UserError, non_negative_int, positive_int, run_command

logger = logging.getLogger(__name__)

SUMMARY_RELATIVE_PATH = "summary/download_summary.json"  # "/"-separated, as fsspec paths are
# img2dataset's ways of spreading shards over workers: processes on this machine, a Spark cluster, a Ray cluster.
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


def download_images(
    url_list: str | os.PathLike,
    output_folder: str | os.PathLike,
    *,
    image_size: int = 224,
    resize_mode: str = "center_crop",
    processes_count: int = 16,
    thread_count: int = 64,
    number_sample_per_shard: int = 10_000,
    url_col: str = "image_url",
    caption_col: str = "caption",
    timeout: int = 10,
    retries: int = 0,
    encode_quality: int = 95,
    min_image_size: int = 0,
    max_image_area: float = float("inf"),
    max_aspect_ratio: float = float("inf"),
    save_additional_columns: Sequence[str] | None = None,
    incremental_mode: str = "incremental",
    distributor: str = "multiprocessing",
    spark_master: str | None = None,
) -> dict[str, Any]:
    """Run img2dataset on a parquet URL list, then return (and save) `summarize_download`'s summary.

    `url_list` and `output_folder` are local paths or fsspec URLs (s3://, hdfs://, ...). `distributor` is
    img2dataset's: "multiprocessing" runs `processes_count` processes here; "pyspark" runs one Spark task per
    shard in the active SparkSession, or in a new one on `spark_master` (default local[processes_count]);
    "ray" runs one Ray task per shard on the Ray cluster `ray.init()` finds (RAY_ADDRESS, `ray start`) or on a
    local one. Every worker runs `thread_count` download threads.

    img2dataset starts worker processes with "spawn", which re-imports the caller's main module:
    call this from under `if __name__ == "__main__":` (as `python -m data.download` does).
    """
    if incremental_mode not in ("incremental", "extend"):
        raise UserError(
            f"incremental_mode {incremental_mode!r} is not supported; use 'incremental' (resume) or 'extend' "
            "(add shards). To start over, delete the output folder ('overwrite' hangs img2dataset)"
        )
    if distributor not in DISTRIBUTORS:
        raise UserError(f"distributor {distributor!r} is not one of img2dataset's: {', '.join(DISTRIBUTORS)}")
    if spark_master is not None and distributor != "pyspark":
        raise UserError(
            f"Spark master {spark_master!r} is only used by the pyspark distributor, not {distributor!r}: choose "
            "pyspark or leave the master out"
        )
    url_list = os.fspath(url_list)
    url_fs, url_path = fsspec.core.url_to_fs(url_list)
    if not url_fs.isfile(url_path):
        raise UserError(f"URL list {url_list} not found; build one with `python -m data.conceptual_captions`")
    names = pq.read_schema(url_path, filesystem=url_fs).names
    extra = (("extra", column) for column in save_additional_columns or ())
    for role, column in (("url", url_col), ("caption", caption_col), *extra):
        if column not in names:
            raise UserError(f"{role} column {column!r} not found in {url_list}; columns are: {', '.join(names)}")
    # albumentations (imported by img2dataset) checks the network for updates unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with _distributor_ready(distributor, processes_count, spark_master):
        from img2dataset import download  # noqa: PLC0415 - slow import (wandb, cv2); only needed here

        download(
            url_list=url_list,
            output_folder=os.fspath(output_folder),
            image_size=image_size,
            resize_mode=resize_mode,
            processes_count=processes_count,
            thread_count=thread_count,
            number_sample_per_shard=number_sample_per_shard,
            input_format="parquet",
            output_format="webdataset",
            url_col=url_col,
            caption_col=caption_col,
            timeout=timeout,
            retries=retries,
            encode_quality=encode_quality,
            min_image_size=min_image_size,
            max_image_area=max_image_area,
            max_aspect_ratio=max_aspect_ratio,
            save_additional_columns=list(save_additional_columns) if save_additional_columns else None,
            incremental_mode=incremental_mode,
            distributor=distributor,
        )
    summary = summarize_download(output_folder)
    for line in summary_lines(summary):
        print(line)
    return summary


@contextmanager
def _distributor_ready(distributor: str, processes_count: int, spark_master: str | None) -> Iterator[None]:
    """For the length of the download, what img2dataset's distributor needs but does not set up well itself."""
    if distributor == "pyspark":
        with _spark_session(processes_count, spark_master):
            yield
    elif distributor == "ray":
        with _ray_connection():
            yield
    else:
        yield


@contextmanager
def _spark_session(processes_count: int, spark_master: str | None) -> Iterator[None]:
    """The active SparkSession (a Spark program or notebook calling this), else a new one, stopped afterwards.

    img2dataset would make its own: always local, with a 16 GB driver and Python workers started as `python3`
    from PATH, which need not be an interpreter that has img2dataset.
    """
    try:
        from pyspark.sql import SparkSession  # noqa: PLC0415 - optional dependency, only for this distributor
    except ModuleNotFoundError:
        raise UserError("the pyspark distributor needs pyspark and Java 17 or newer: pip install pyspark") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        if spark_master is not None and spark_master != active.sparkContext.master:
            raise UserError(
                f"a SparkSession on {active.sparkContext.master} is already active; leave out the Spark master "
                f"{spark_master!r} to download in it"
            )
        yield
        return
    # The driver's JVM starts as Spark's launcher starts it: $JAVA_HOME/bin/java, else java from PATH. Without
    # Java, pyspark fails after a page of shell errors.
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no java on PATH"
        raise UserError(f"Spark needs Java 17 or newer and finds none ({where}): install a JDK or set JAVA_HOME")
    master = spark_master or f"local[{processes_count}]"
    if master.startswith("local"):
        # Workers on this machine: this interpreter, which has img2dataset. On a cluster, PYSPARK_PYTHON says.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master(master)
        .appName("data.download")
        .config("spark.executorEnv.NO_ALBUMENTATIONS_UPDATE", "1")  # as on the driver, see download_images
        .getOrCreate()
    )
    try:
        yield
    finally:
        spark.stop()


@contextmanager
def _ray_connection() -> Iterator[None]:
    """Ray connected for the download: img2dataset's ray distributor does nothing at all when ray is missing."""
    try:
        import ray  # noqa: PLC0415 - optional dependency, only for this distributor
    except ModuleNotFoundError:
        raise UserError("the ray distributor needs ray: pip install ray") from None
    if ray.is_initialized():
        yield
        return
    ray.init()  # the cluster at RAY_ADDRESS or started by `ray start` on this machine, else a new local one
    try:
        yield
    finally:
        ray.shutdown()


def summarize_download(output_folder: str | os.PathLike, *, save: bool = True) -> dict[str, Any]:
    """Totals from the shards' *_stats.json and failures by reason from their parquet files.

    Saved to `<output_folder>/summary/download_summary.json`: not at the top level, where
    img2dataset reads every *.json as a finished shard's stats when resuming.
    """
    folder = os.fspath(output_folder)
    fs, root = fsspec.core.url_to_fs(folder)
    totals = Counter()
    finished = set()
    for path in sorted(fs.glob(f"{root}/*_stats.json")):
        with fs.open(path, "r", encoding="utf-8") as f:
            stats = json.load(f)
        totals.update({k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")})
        finished.add(posixpath.basename(path).split("_")[0])
    reasons: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for path in sorted(fs.glob(f"{root}/*.parquet")):
        table = pq.read_table(path, columns=["status", "error_message"], filesystem=fs).to_pydict()
        for status, message in zip(table["status"], table["error_message"]):
            statuses[status] += 1
            if status != "success":
                reasons[message or "unknown"] += 1
    tars = {posixpath.basename(p)[: -len(".tar")] for p in fs.glob(f"{root}/*.tar")}
    summary = {
        "output_folder": folder,
        "shards": len(finished),
        "unfinished_shards": sorted(tars - finished),
        "count": totals["count"],
        "successes": totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "success_rate": totals["successes"] / totals["count"] if totals["count"] else 0.0,
        "status_counts": dict(statuses.most_common()),
        "failures_by_reason": dict(reasons.most_common()),
    }
    if save:
        path = f"{root}/{SUMMARY_RELATIVE_PATH}"
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        logger.info("download summary saved to %s", path)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A readable report of `summarize_download`'s result."""
    lines = [
        f"{summary['successes']} of {summary['count']} images downloaded ({summary['success_rate']:.1%}) "
        f"into {summary['shards']} shards in {summary['output_folder']}",
        f"failed to download: {summary['failed_to_download']}, failed to resize: {summary['failed_to_resize']}",
    ]
    lines += [f"  {count:>8}  {reason}" for reason, count in summary["failures_by_reason"].items()]
    if summary["unfinished_shards"]:
        lines.append(
            f"unfinished shards (no stats file): {', '.join(summary['unfinished_shards'])}; run the same command "
            "again to finish them"
        )
    return lines


def _parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(
        prog="python -m data.download",
        description=(
            "Step 2 of the real-data recipe: download the images of a URL parquet (from python -m "
            "data.conceptual_captions) with img2dataset into webdataset shards, then print and save a summary "
            "of successes and failures by reason. Re-run the same command to resume an interrupted download."
        ),
        epilog=(
            "example: python -m data.download --url-list data/cc_200k.parquet --output-folder data/cc_images\n"
            "then: load_image_text_dataset('data/cc_images') in data.loading, or the training configs' data path"
        ),
        formatter_class=RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url-list", required=True, help="parquet file with the URL and caption columns (a path or an fsspec URL)"
    )
    parser.add_argument(
        "--output-folder", required=True,
        help="folder for the shards, created if missing: a path or an fsspec URL (s3://bucket/cc_images, hdfs://...)",
    )
    parser.add_argument("--image-size", type=positive_int, default=224, help="output image side (default 224)")
    parser.add_argument(
        "--resize-mode", default="center_crop",
        choices=["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"],
        help="how to fit images to the size (default center_crop)",
    )
    parser.add_argument(
        "--distributor", default="multiprocessing", choices=DISTRIBUTORS,
        help="img2dataset's: processes on this machine (default), one Spark task per shard (pip install pyspark), "
        "or one Ray task per shard on the cluster ray.init() finds, else a local one (pip install ray)",
    )
    parser.add_argument(
        "--spark-master",
        help="with --distributor pyspark: the cluster, e.g. spark://host:7077 (default local[PROCESSES])",
    )
    parser.add_argument(
        "--processes", type=positive_int, default=16,
        help="download processes with multiprocessing, Spark's local[PROCESSES] (default 16); Ray uses its CPUs",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=64, help="threads per process, Spark task or Ray task (default 64)"
    )
    parser.add_argument("--samples-per-shard", type=positive_int, default=10_000, help="URLs per shard (default 10000)")
    parser.add_argument("--url-col", default="image_url", help="URL column (default image_url)")
    parser.add_argument("--caption-col", default="caption", help="caption column (default caption)")
    parser.add_argument("--timeout", type=positive_int, default=10, help="seconds per request (default 10)")
    parser.add_argument("--retries", type=non_negative_int, default=0, help="retries per URL (default 0)")
    parser.add_argument("--min-image-size", type=non_negative_int, default=0,
                        help="skip images with a smaller side (default 0)")
    parser.add_argument(
        "--max-image-area", type=float, default=float("inf"), help="skip images with more pixels (default: no limit)"
    )
    parser.add_argument(
        "--extend", action="store_true", help="add new shards after the existing ones instead of resuming"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    download_images(
        args.url_list, args.output_folder, image_size=args.image_size, resize_mode=args.resize_mode,
        processes_count=args.processes, thread_count=args.threads, number_sample_per_shard=args.samples_per_shard,
        url_col=args.url_col, caption_col=args.caption_col, timeout=args.timeout, retries=args.retries,
        min_image_size=args.min_image_size, max_image_area=args.max_image_area,
        incremental_mode="extend" if args.extend else "incremental", distributor=args.distributor,
        spark_master=args.spark_master,
    )


if __name__ == "__main__":
    run_command(main)
