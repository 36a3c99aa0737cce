"""`python -m eval --model <folder or Hub id> --data <shards or dataset> --out <dir>`: evaluate and write a report."""

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from cli import ArgumentParser, UserError, positive_int, run_command

from .generation import GENERATION_PRESETS
from .model_card import CARD_NAME, update_evaluation
from .report import load_log_history
from .run import RETRIEVAL_TEXTS, evaluate_model

logger = logging.getLogger("eval")


def _parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(
        prog="python -m eval",
        description=(
            "Evaluate a stage-1 Q-Former (retrieval) or a VLM (captioning, VQA, and retrieval through its Q-Former) "
            "and write metrics.json, report.md, pictures and CSVs into --out."
        ),
        epilog="examples: python -m eval --model outputs/demo/vlm --data data/shapes --split validation "
               "--out outputs/demo/eval; "
               "python -m eval --model outputs/base/vlm --data yerevann/coco-karpathy --split test "
               "--image-column url --caption-column sentences --id-column cocoid --retrieval-texts references "
               "--out outputs/base/coco-karpathy; "
               "python -m eval --model outputs/base/vlm --data data/vqav2_val.parquet --question-column question "
               "--answer-column answers --out outputs/base/vqav2",
    )
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub id")
    parser.add_argument("--data", required=True, help="shards folder, .tar files, dataset folder/file or Hub dataset")
    parser.add_argument("--out", required=True, help="output folder for the report")
    parser.add_argument("--split", default=None, help="data split (default: the only one, or train)")
    parser.add_argument("--image-column", default=None,
                        help="image column of a datasets source (default: its Image column, or image/img/jpg...)")
    parser.add_argument("--caption-column", default=None,
                        help="caption column of a datasets source; a list of captions per image makes them all "
                             "references (default: caption/captions/text/sentences...); for shards, the field of "
                             "each sample's .json (default: the .txt member), e.g. the shapes data's "
                             "caption_color_first for a Q-Former trained on it")
    parser.add_argument("--id-column", default=None,
                        help="image id column of a datasets source: the id in captions.csv, and images with "
                             "different ids are never each other's duplicates (default: the row number, and "
                             "duplicates by equal first caption)")
    parser.add_argument("--question-column", default=None,
                        help="question column of a datasets source (with --answer-column): one question per row, "
                             "scored by VQA; data without captions gets VQA only")
    parser.add_argument("--answer-column", default=None,
                        help="answer column of a datasets source (with --question-column); a list of human answers "
                             "(VQAv2's dicts or strings, TextVQA) adds the official VQAv2 accuracy")
    parser.add_argument("--retrieval-texts", choices=RETRIEVAL_TEXTS, default="caption",
                        help="caption: each image against its caption; references: against all its reference "
                             "captions, an image->text hit being any of them (the COCO/Flickr30k protocol)")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--strategy", choices=sorted(GENERATION_PRESETS), default="greedy", help="caption decoding")
    parser.add_argument("--max-new-tokens", type=positive_int, default=40, help="longest caption, in tokens")
    parser.add_argument("--no-shuffled", action="store_true", help="skip captioning with another image's pixels")
    parser.add_argument("--no-vqa", action="store_true", help="skip visual question answering")
    parser.add_argument("--meteor", choices=["auto", "on", "off"], default="auto",
                        help="METEOR needs Java; auto computes it when java is on PATH")
    parser.add_argument("--qformer-tokenizer", default=None,
                        help="the Q-Former's text tokenizer (e.g. the stage-1 folder) for retrieval with a VLM")
    parser.add_argument("--trainer-state", action="append", default=[], metavar="[LABEL=]PATH",
                        help="a trainer_state.json (or its folder) to draw training curves from; repeatable. "
                             "Default: the model folder's own trainer_state.json if it has one")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--update-card", action="store_true",
                        help=f"replace the evaluation section of the model folder's {CARD_NAME} with these results")
    return parser.parse_args(argv)


def _log_histories(specs: Sequence[str], model: str) -> dict[str, list[dict]]:
    if not specs and (Path(model) / "trainer_state.json").is_file():
        specs = [f"training={model}"]
    histories = {}
    for spec in specs:
        label, _, path = spec.rpartition("=")
        if not Path(path).exists():
            raise UserError(f"--trainer-state {path}: no such file or folder; give a trainer_state.json or its folder")
        histories[label or Path(path).name] = load_log_history(path)
    return histories


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse_args(argv)
    if (args.question_column is None) != (args.answer_column is None):
        raise UserError("--question-column and --answer-column go together; give both, or neither")
    if args.meteor == "on" and shutil.which("java") is None:
        raise UserError("--meteor on needs a `java` executable on PATH; install a JRE or use --meteor auto/off")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = evaluate_model(
        args.model, args.data, args.out, split=args.split, max_samples=args.max_samples, batch_size=args.batch_size,
        strategy=args.strategy, max_new_tokens=args.max_new_tokens, shuffled=not args.no_shuffled,
        vqa=not args.no_vqa, meteor={"auto": None, "on": True, "off": False}[args.meteor],
        qformer_tokenizer=args.qformer_tokenizer, image_column=args.image_column, caption_column=args.caption_column,
        id_column=args.id_column, question_column=args.question_column, answer_column=args.answer_column,
        retrieval_texts=args.retrieval_texts,
        log_histories=_log_histories(args.trainer_state, args.model), device=args.device,
    )
    logger.info("report in %s/report.md", args.out)
    if args.update_card:
        logger.info("evaluation written into %s", update_evaluation(args.model, metrics))
    print(json.dumps({k: v for k, v in metrics.items() if k != "meta"}, indent=2))
    return metrics


if __name__ == "__main__":
    run_command(main)
