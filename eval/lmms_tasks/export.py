"""`python -m eval.lmms_tasks.export --data <shards> --out <dir>`: an lmms-eval task folder made from our data.

The folder holds one parquet file and one task YAML per task (`shapes_vqa`, `shapes_caption`):
each YAML includes its template from this package and names its parquet file relative to itself, which lmms-eval
resolves against the YAML's folder. So where the data lives is chosen by `--out`, and the folder runs as it is:

    python -m lmms_eval --model huggingface --model_args pretrained=<vlm>,trust_remote_code=True \
        --include_path <dir> --tasks shapes_vqa,shapes_caption --log_samples --output_path <results>
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import yaml
from datasets import Dataset, Features, Image, List, Value

from cli import ArgumentParser, UserError, positive_int, run_command
from data.loading import load_image_text_dataset

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent
VQA_TASK = "shapes_vqa"
CAPTION_TASK = "shapes_caption"

# The image's own encoded bytes: both harnesses decode the same file, so they see the same pixels.
VQA_FEATURES = Features({"image": Image(), "key": Value("string"), "question": Value("string"),
                         "answer": Value("string"), "type": Value("string")})
CAPTION_FEATURES = Features({"image": Image(), "key": Value("string"), "caption": Value("string"),
                             "references": List(Value("string"))})


def _write_task(out: Path, task: str, rows: list[dict], features: Features, source: str) -> None:
    data_file = f"{task}.parquet"
    Dataset.from_list(rows, features=features).to_parquet(out / data_file)
    config = {"task": task, "include": str(TEMPLATES / f"{task}_template.yaml"),
              "dataset_kwargs": {"data_files": {"test": data_file}}}
    header = f"# Written by python -m eval.lmms_tasks.export from {source}: {len(rows)} samples.\n"
    (out / f"{task}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    logger.info("%s: %d samples in %s", task, len(rows), out / data_file)


def export_tasks(data: str, out: str | Path, split: str | None = None, max_samples: int | None = None) -> dict:
    """Writes the VQA task (one row per question) and the captioning task (one row per image) into `out`.

    The rows are `python -m eval`'s: the first `max_samples` of the split, questions in their order. A task the
    data has nothing for (no question-answer pairs, no captions) is left out.

    Returns:
        `{task name: number of samples}` of the tasks written.
    """
    dataset = load_image_text_dataset(data, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    dataset = dataset.cast_column("image", Image(decode=False))
    vqa, captions = [], []
    for row in dataset:
        image, key = row["image"], row["key"]
        vqa += [{"image": image, "key": key, **{k: qa[k] for k in ("question", "answer", "type")}} for qa in row["qa"]]
        # The loader lists the caption first among the references, as captioning evaluation scores them.
        if row["references"]:
            captions.append({"image": image, "key": key, "caption": row["caption"], "references": row["references"]})
    if not vqa and not captions:
        raise UserError(f"--data {data}: no rows with captions or question-answer pairs to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = data + (f" [{split}]" if split else "")
    written = {}
    for task, rows, features in ((VQA_TASK, vqa, VQA_FEATURES), (CAPTION_TASK, captions, CAPTION_FEATURES)):
        if rows:
            _write_task(out, task, rows, features, source)
            written[task] = len(rows)
    return written


def main(argv: Sequence[str] | None = None) -> dict:
    parser = ArgumentParser(
        prog="python -m eval.lmms_tasks.export",
        description="Write lmms-eval tasks (VQA and captioning, scored as python -m eval scores them) made from "
                    "shards or any image-text source into a folder for lmms_eval --include_path.",
        epilog="example: python -m eval.lmms_tasks.export --data outputs/demo/data --split validation "
               "--out outputs/lmms_tasks/shapes",
    )
    parser.add_argument("--data", required=True, help="shards folder, .tar files, dataset folder/file or Hub dataset")
    parser.add_argument("--out", required=True, help="the task folder to write (pass it to lmms_eval --include_path)")
    parser.add_argument("--split", default=None, help="data split (default: the only one, or train)")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="export the first N images only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    written = export_tasks(args.data, args.out, split=args.split, max_samples=args.max_samples)
    for task, count in written.items():
        print(f"{task}: {count} samples")
    print(f"run: python -m lmms_eval --include_path {args.out} --tasks {','.join(written)} ...")
    return written


if __name__ == "__main__":
    run_command(main)
