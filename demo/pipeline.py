"""The whole pipeline on the offline shapes set, on a laptop CPU: data, both training stages, evaluation, report.

Steps: generate the data, holding attribute combinations out of training (--holdout); evaluate the untrained models
(built exactly as training starts them, on the first --untrained-eval-samples); train stage 1 and stage 2 with the
same entry points and configs users run on GPUs (configs/tiny/*.yaml); evaluate the trained models (captions are also
scored against the drawn scene, and against shuffled images) and write that evaluation into their model cards; write
outputs/demo/ (models, report.md, pictures, metrics.json) and print a table. Retrieval, caption recall and VQA are
also scored apart on the held-out combinations (the `_held_out` rows) and on the seen ones (`_seen`).

A demo stopped by Ctrl-C or a scheduler's signal leaves a checkpoint of the stage it was training; the same command
run again resumes that stage from it (another command starts over).
"""

import json
import logging
import shutil
import sys
import time
from argparse import RawDescriptionHelpFormatter
from functools import partial
from pathlib import Path

import torch

from cli import ArgumentParser, non_negative_int, positive_int
from data.synthetic import generate_dataset
from eval.model_card import update_evaluation, write_model_card
from eval.report import load_log_history, plot_training_curves
from eval.run import evaluate_model
from training import train_qformer, train_vlm
from training.arguments import DataArguments, QFormerModelArguments, TrainingArguments, VLMModelArguments, parse_args
from training.checkpoints import last_complete_checkpoint
from training.models import build_stage1_model, build_stage2_model
from training.output_lock import OutputDirLock
from training.stage import cpu_has_bf16, load_splits, start_stage, text_corpus

from .report import stage1_scores, stage2_scores, table, write_report

logger = logging.getLogger("demo")

# The training section of the untrained baselines' model cards.
UNTRAINED = [["training", "none: the demo's untrained baseline, built as training starts"]]
# A colour-shape pair and a size-colour pair: neither is in any training sample, both are in validation.
DEFAULT_HOLDOUTS = ["green triangle", "large blue"]
# The two training command lines of the demo that last ran in an output folder: a rerun resumes only its own.
COMMAND_RECORD = "demo_command.json"


def parse_demo_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m demo", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--train", type=positive_int, default=20000, help="training samples to generate")
    parser.add_argument("--validation", type=positive_int, default=1000, help="validation samples to generate")
    parser.add_argument("--stage1-config", default="configs/tiny/stage1.yaml", help="stage-1 YAML")
    parser.add_argument("--stage2-config", default="configs/tiny/stage2.yaml", help="stage-2 YAML")
    parser.add_argument("--stage1-steps", type=positive_int, default=None, help="override max_steps of stage 1")
    parser.add_argument("--stage2-steps", type=positive_int, default=None, help="override max_steps of stage 2")
    parser.add_argument("--eval-samples", type=positive_int, default=None,
                        help="evaluate on the first N validation samples")
    # The untrained models score about zero; a smaller sample tells that as well, in less time.
    parser.add_argument("--untrained-eval-samples", type=positive_int, default=100,
                        help="evaluate the untrained baselines on the first N validation samples (default 100)")
    parser.add_argument("--holdout", nargs="*", default=DEFAULT_HOLDOUTS, metavar="COMBO",
                        help="attribute combinations kept out of training and scored apart, e.g. 'green triangle' "
                             f"(default: {', '.join(map(repr, DEFAULT_HOLDOUTS))}); --holdout alone holds none out")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data, models and order")
    parser.add_argument("--extra", nargs="...", default=[],
                        help="further overrides for both training runs, e.g. --extra --logging_steps 5")
    return parser.parse_args(argv)


def stage_command_lines(args, out: Path, bf16_in_hardware: bool) -> tuple[list[str], list[str]]:
    """The two training runs' command lines: config file, output folder, data, seed, the demo's step overrides, then
    `--extra`. Without bfloat16 in hardware (no GPU, no AVX-512 BF16 or AMX), stage 2 trains in float32, which is
    faster there than emulated bf16; an `--extra --bf16 true` still wins, coming later."""
    common = ["--train_data", str(out / "data"), "--eval_data", str(out / "data"), "--seed", str(args.seed)]
    stage1 = [args.stage1_config, "--output_dir", str(out / "qformer"), *common]
    stage2 = [args.stage2_config, *([] if bf16_in_hardware else ["--bf16", "false"]), "--output_dir",
              str(out / "vlm"), "--qformer_name_or_path", str(out / "qformer"), *common]
    stage1 += ["--max_steps", str(args.stage1_steps)] if args.stage1_steps else []
    stage2 += ["--max_steps", str(args.stage2_steps)] if args.stage2_steps else []
    return stage1 + args.extra, stage2 + args.extra


def clear_previous_outputs(out: Path, stage1: list[str], stage2: list[str]) -> list[str]:
    """Removes what an earlier demo left in `out`, except a stage folder holding a complete checkpoint written by
    these same command lines: a demo stopped by Ctrl-C or a scheduler's signal resumes there when run again, as the
    stopped stage said it would. Returns the stage folders kept."""
    commands = {"stage1": stage1, "stage2": stage2}
    record = out / COMMAND_RECORD
    same_command = record.is_file() and json.loads(record.read_text()) == commands
    kept = []
    for name in ("qformer", "vlm", "untrained", "eval"):
        if same_command and name in ("qformer", "vlm") and last_complete_checkpoint(out / name, quiet=True):
            logger.info("keeping %s: it holds a checkpoint of this same demo, which its training resumes from",
                        out / name)
            kept.append(name)
        else:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(commands))
    return kept


def save_untrained(out: Path, stage1: list[str], stage2: list[str]) -> tuple[Path, Path]:
    """The tiny models exactly as training starts them (same start-up, data, builders and seed), saved for
    evaluation. `stage1`/`stage2` are the training runs' command lines."""
    model_args, data_args, training_args = start_stage(QFormerModelArguments, stage1)
    train, _ = load_splits(data_args, training_args)
    qformer, processor = build_stage1_model(model_args, partial(text_corpus, train))
    qformer.save_pretrained(out / "qformer")
    processor.save_pretrained(out / "qformer")
    write_model_card(out / "qformer", qformer, repo="untrained-qformer", training=UNTRAINED)

    model_args, data_args, training_args = start_stage(
        VLMModelArguments, [*stage2, "--qformer_name_or_path", str(out / "qformer")])
    train, _ = load_splits(data_args, training_args)
    vlm, processor = build_stage2_model(model_args, partial(text_corpus, train))
    if hasattr(vlm, "merge_and_unload"):  # LoRA at its start changes nothing: save the plain model
        vlm = vlm.merge_and_unload()
    vlm.save_pretrained(out / "vlm")
    processor.save_pretrained(out / "vlm")
    write_model_card(out / "vlm", vlm, repo="untrained-vlm", training=UNTRAINED)
    return out / "qformer", out / "vlm"


def evaluate_pair(qformer: Path, vlm: Path, data: Path, out: Path, max_samples: int | None, histories=None, *,
                  stage1_caption_column: str | None = None):
    """Stage-1 retrieval (on the captions stage 1 trains on: `stage1_caption_column`) and stage-2 captioning/VQA/
    scene checks on the validation split: (stage-1, stage-2) metrics as `eval.run.evaluate_model` returns them."""
    common = {"split": "validation", "max_samples": max_samples, "meteor": False, "batch_size": 64}
    stage1 = evaluate_model(str(qformer), str(data), out / "qformer", caption_column=stage1_caption_column, **common)
    stage2 = evaluate_model(str(vlm), str(data), out / "vlm", log_histories=histories, **common)
    return stage1, stage2


def main(argv: list[str] | None = None) -> dict:
    args = parse_demo_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    start = time.time()
    out = Path(args.out)
    data = out / "data"
    bf16_in_hardware = torch.cuda.is_available() or cpu_has_bf16()
    stage1, stage2 = stage_command_lines(args, out, bf16_in_hardware)
    # A mistake in a config file or in --extra is reported now, not after minutes of data and stage 1.
    _, stage1_data, _ = parse_args((QFormerModelArguments, DataArguments, TrainingArguments), stage1)
    parse_args((VLMModelArguments, DataArguments, TrainingArguments), stage2)

    # Before anything in `out` is removed or rewritten: a second demo into the same folder stops here.
    OutputDirLock(out).acquire()
    if not bf16_in_hardware:
        logger.info("this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX): stage 2 trains in float32")
    logger.info("1/5 generating %d training and %d validation images in %s", args.train, args.validation, data)
    generate_dataset(data, {"train": args.train, "validation": args.validation}, seed=args.seed,
                     holdouts=args.holdout, overwrite=True)

    n_validation = min(args.eval_samples or args.validation, args.validation)
    n_untrained = min(args.untrained_eval_samples, n_validation)
    logger.info("2/5 evaluating the untrained models on %d validation samples", n_untrained)
    clear_previous_outputs(out, stage1, stage2)
    untrained_q, untrained_v = save_untrained(out / "untrained", stage1, stage2)
    u1, u2 = evaluate_pair(untrained_q, untrained_v, data, out / "untrained" / "eval", n_untrained,
                           stage1_caption_column=stage1_data.caption_column)
    update_evaluation(untrained_q, u1)
    update_evaluation(untrained_v, u2)

    logger.info("3/5 training stage 1 (Q-Former)")
    train_qformer.main(stage1)

    logger.info("4/5 training stage 2 (VLM)")
    train_vlm.main(stage2)

    logger.info("5/5 evaluating the trained models")
    histories = {f"stage {i}": load_log_history(out / name / "trainer_state.json")
                 for i, name in ((1, "qformer"), (2, "vlm"))}
    t1, t2 = evaluate_pair(out / "qformer", out / "vlm", data, out / "eval", n_validation, histories,
                           stage1_caption_column=stage1_data.caption_column)
    update_evaluation(out / "qformer", t1)
    update_evaluation(out / "vlm", t2)
    shutil.copy(out / "eval" / "qformer" / "similarity_grid.png", out / "similarity_grid.png")
    shutil.copy(out / "eval" / "vlm" / "captions.png", out / "captions.png")
    shutil.copy(out / "eval" / "vlm" / "captions.csv", out / "captions.csv")
    if (out / "eval" / "vlm" / "captions_held_out.png").exists():
        shutil.copy(out / "eval" / "vlm" / "captions_held_out.png", out / "captions_held_out.png")
    plot_training_curves(histories, out / "curves.png")

    metrics = {
        "stage1": stage1_scores(t1),
        "stage2": stage2_scores(t2),
        "untrained": {"stage1": stage1_scores(u1), "stage2": stage2_scores(u2)},
        "wall_seconds": round(time.time() - start, 1),
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "samples": {"train": args.train, "validation": n_validation, "untrained_validation": n_untrained},
        "holdouts": args.holdout,
    }
    write_report(out, metrics)
    print("\n" + table(metrics))
    print(f"\nwall time {metrics['wall_seconds']:.0f} s; files in {out}/: report.md, metrics.json, "
          "similarity_grid.png, captions.png, captions_held_out.png, curves.png, captions.csv, qformer/, vlm/")
    return metrics


__all__ = ["evaluate_pair", "main", "parse_demo_args", "save_untrained"]
