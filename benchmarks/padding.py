"""Padding in stage-2 batches, shuffled at random against grouped by length with transformers' LengthGroupedSampler.

    python -m benchmarks.padding                          # 20,000 conversations, batches of 8, 16 and 32
    python -m benchmarks.padding --samples 100000 --batch-sizes 4,64 --seed 1 --mix llava_instruct_150k
    python -m benchmarks.padding --grad-accum 4           # the sampler groups at batch x 4, as the Trainer asks it

A batch is padded to its longest conversation, and a conversation's length is its text tokens plus
num_images x num_query_tokens (each image becomes `--num-query-tokens` visual tokens, 32 in the base recipe), capped at
`--max-length`. `--group_by_length` hands those lengths to `transformers.trainer_pt_utils.LengthGroupedSampler`, the
sampler transformers 5 builds for `train_sampling_strategy="group_by_length"` (the old `group_by_length=True`).
Nothing is trained and no GPU is used: the script draws a synthetic set of lengths (below), orders it several ways,
cuts each order into consecutive batches as the Trainer's DataLoader does (the last one may be short) and reports the
padding fraction, padded positions / all positions of the padded batches:

- random: `torch.randperm(n)` with a generator seeded by `--seed`, the order of a shuffled DataLoader;
- grouped: `LengthGroupedSampler(batch x --grad-accum, lengths=..., generator=<same seed>)`, the batch size the
  Trainer gives it. The sampler draws the same randperm first, so the two are paired: grouped is the random order with
  each megabatch (min(n // (4 x its batch), 50) of its batches) sorted longest first, and the longest conversation of
  all swapped into the first batch;
- sorted: the whole set sorted by length, longest first, with no randomness left: the floor for any order when n is a
  multiple of the batch (the k-th longest batch maximum is at least the ((k-1) x batch + 1)-th longest length);
- two processes: the same orders through accelerate's `BatchSamplerShard` (what the Trainer's prepared DataLoader does:
  whole batches dealt to the processes in turn from one shared order), and through transformers'
  `DistributedLengthGroupedSampler` (still in transformers 5, no longer used by the Trainer), each rank batching
  its own share.

One JSON line per batch size on stdout (see benchmarks/README.md for the keys), after one line describing the lengths;
the table goes to stderr.

The length distribution ("llava_v1_5_mix665k", the default) is shaped after LLaVA-1.5's instruction mix. No record
of it is read here (no Hub access): every component is drawn from the parameters below. Words become tokens at
1.3 tokens per word (assumption: the usual ratio for English under a ~32-50k BPE vocabulary, SmolLM's included), and
every message adds the 5 tokens of the project's ChatML frame (`<|im_start|>`, role, newline, `<|im_end|>`, newline;
`modeling/processing_vlm.chatml_template`, no system prompt). Per record: `rounds` user/assistant exchanges; question
and answer words are normal (mean, sd) or lognormal (median, sigma) draws, at least 1 word.

| component | records | images | rounds | question words | answer words |
|---|---:|---:|---|---|---|
| LLaVA-Instruct conversation | 57,894 | 1 | 2-5 uniform | N(10, 3) | N(25, 12); last N(150, 60) |
| LLaVA-Instruct detail | 22,959 | 1 | 1 | N(8, 2) | N(79, 18) |
| LLaVA-Instruct complex reasoning | 76,859 | 1 | 1 | N(12, 4) | N(105, 23) |
| ShareGPT (text only) | 40,688 | 0 | geometric, mean 3 | lognormal(30, 1.0) | lognormal(150, 0.8) |
| VQAv2 | 82,783 | 1 | 1 + Poisson, mean 5.4 | N(6, 2) + 9 | N(1.2, 0.5) |
| GQA | 72,140 | 1 | 1 + Poisson, mean 13 | N(9, 3) + 9 | N(1.3, 0.5) |
| OKVQA | 8,998 | 1 | 1 | N(8, 3) + 9 | N(1.3, 0.5) |
| OCR-VQA | 80,000 | 1 | 1 + Poisson, mean 4.8 | N(6, 1.5) + 9 | N(4, 3) |
| A-OKVQA (multiple choice) | 66,160 | 1 | 1 | N(21, 4) + 10 | 1 |
| TextCaps | 21,953 | 1 | 1 | 8 | N(12, 4) |
| RefCOCO (regions) | 48,447 | 1 | 1 + Poisson, mean 3.5 | N(12, 3) | N(4, 2); + 20 tokens |
| Visual Genome (regions) | 86,417 | 1 | 1 + Poisson, mean 10 | N(9, 2) | N(5, 2); + 20 tokens |

Where the figures come from:

- Records per component: the counts Haotian Liu recomputed for llava_v1_5_mix665k.json in LLaVA issue #702 (LLaVA
  157,712, SG40k 40,688, VQAv2 82,783, GQA 72,140, OKVQA 8,998, OCR-VQA 80,000, A-OKVQA 66,160, TextCaps 21,953,
  RefCOCO 48,447; Visual Genome takes the rest of the 665,298 rows counted in issue #657, 86,417, which is also that
  issue's count of rows with VG images). The LLaVA rows are split 58 : 23 : 77 as LLaVA-Instruct-150K's
  conversation / detail / complex-reasoning subsets (LLaVA project page: 58K, 23K and 77K; file names
  conversation_58k, detail_23k, complex_reasoning_77k in LLaVA's docs/Data.md). 40,688 of 665,298 rows (6.1%) are
  text-only.
- Detail and complex reasoning: means and sds of the GPT-4 outputs in LLaVA's
  playground/data/coco2014_val_gpt4_qa_30x3.jsonl, made by the same pipeline on 30 COCO val images (measured here:
  answers 79.3 +- 18.4 and 105.2 +- 22.8 words, questions 7.9 and 12.1 words). A small sample, but real records.
- Conversation: LLaVA's two few-shot conversations (playground/data/prompts/conversation/00{0,1}_conv.txt) have 4
  rounds, questions of 5-12 words, answers of 8-80 words and a long last answer (222 and 345 words); the same val
  file's one-round conversation answers average 16.7 words. Rounds 2-5 and the answer parameters are assumptions
  in that range, giving ~250 words a record, about 2.8x a detail record; docs/Data.md's file sizes give 2.4x in bytes
  per record (126 MB / 58K against 20.5 MB / 23K, JSON keys included, which shrink the ratio).
- VQA rows: one record per image (VQAv2's 82,783 and GQA's 72,140 rows match those sets' train image counts), every
  question followed by the 9-word response-format prompt "Answer the question using a single word or phrase."
  (A-OKVQA: the 10-word "Answer with the option's letter from the given choices directly." after the question and
  its 4 options; both prompts are in LLaVA's docs/Evaluation.md. TextCaps: "Provide a one-sentence caption for the
  provided image.", 8 words, recalled from the LLaVA-1.5 paper). Rounds per record from the datasets' own questions
  per image: OCR-VQA >1M questions on 207,572 covers (4.8); VQAv2 ~443K train questions on 82,783 images (5.4) and
  GQA's balanced train split ~943K questions on its 72,140 train images (13) are recalled, not re-checked here.
  Question and answer lengths are assumptions (short questions, one-word answers, book titles and authors for
  OCR-VQA).
- Regions (RefCOCO, VG): a box is written as 4 coordinates, counted as 20 tokens (assumption: digits split one per
  token); rounds per record are assumptions. As a check on all the round counts: split into records of at most 6
  rounds, this mix would hold ~0.92M records; LLaMA-VID ships llava_v1_5_mix665k_maxround_6_total_921k.json.
- ShareGPT: an assumption (long multi-round chats, many over 1,000 tokens, as the vLLM paper notes of ShareGPT),
  capped by `--max-length` 2048, LLaVA-1.5's model_max_length (scripts/v1_5/finetune.sh).

`--mix llava_instruct_150k` keeps only the three LLaVA-Instruct rows (all with an image).
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler
from transformers.trainer_pt_utils import DistributedLengthGroupedSampler, LengthGroupedSampler

TOKENS_PER_WORD = 1.3
CHATML_TOKENS_PER_MESSAGE = 5


@dataclass(frozen=True)
class Component:
    """One source of the mix. Word specs: ("normal", mean, sd), ("lognormal", median, sigma) or ("fixed", words)."""

    name: str
    records: int
    images: int
    rounds: tuple  # ("fixed", k) | ("uniform", lo, hi) | ("poisson", mean): 1 + Poisson(mean - 1) | ("geometric", mean)
    question: tuple
    answer: tuple
    last_answer: tuple | None = None  # the last answer of a record, where it differs
    prompt_words: int = 0  # a fixed response-format prompt after every question
    extra_tokens: int = 0  # tokens per round that word counts miss (box coordinates)


LLAVA_INSTRUCT = (
    Component("llava_conversation", 57_894, 1, ("uniform", 2, 5), ("normal", 10, 3), ("normal", 25, 12),
              last_answer=("normal", 150, 60)),
    Component("llava_detail", 22_959, 1, ("fixed", 1), ("normal", 8, 2), ("normal", 79, 18)),
    Component("llava_complex_reasoning", 76_859, 1, ("fixed", 1), ("normal", 12, 4), ("normal", 105, 23)),
)
MIXES = {
    "llava_v1_5_mix665k": (
        *LLAVA_INSTRUCT,
        Component("sharegpt", 40_688, 0, ("geometric", 3), ("lognormal", 30, 1.0), ("lognormal", 150, 0.8)),
        Component("vqav2", 82_783, 1, ("poisson", 5.4), ("normal", 6, 2), ("normal", 1.2, 0.5), prompt_words=9),
        Component("gqa", 72_140, 1, ("poisson", 13), ("normal", 9, 3), ("normal", 1.3, 0.5), prompt_words=9),
        Component("okvqa", 8_998, 1, ("fixed", 1), ("normal", 8, 3), ("normal", 1.3, 0.5), prompt_words=9),
        Component("ocrvqa", 80_000, 1, ("poisson", 4.8), ("normal", 6, 1.5), ("normal", 4, 3), prompt_words=9),
        Component("aokvqa", 66_160, 1, ("fixed", 1), ("normal", 21, 4), ("fixed", 1), prompt_words=10),
        Component("textcaps", 21_953, 1, ("fixed", 1), ("fixed", 8), ("normal", 12, 4)),
        Component("refcoco", 48_447, 1, ("poisson", 3.5), ("normal", 12, 3), ("normal", 4, 2), extra_tokens=20),
        Component("vg", 86_417, 1, ("poisson", 10), ("normal", 9, 2), ("normal", 5, 2), extra_tokens=20),
    ),
    "llava_instruct_150k": LLAVA_INSTRUCT,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def draw_words(rng: np.random.Generator, spec: tuple, n: int) -> np.ndarray:
    kind = spec[0]
    if kind == "fixed":
        words = np.full(n, float(spec[1]))
    elif kind == "normal":
        words = rng.normal(spec[1], spec[2], n)
    elif kind == "lognormal":
        words = rng.lognormal(math.log(spec[1]), spec[2], n)
    else:
        raise ValueError(f"unknown word spec {spec}")
    return np.maximum(np.rint(words), 1)


def draw_rounds(rng: np.random.Generator, spec: tuple, n: int) -> np.ndarray:
    kind = spec[0]
    if kind == "fixed":
        return np.full(n, spec[1], dtype=np.int64)
    if kind == "uniform":
        return rng.integers(spec[1], spec[2] + 1, n)
    if kind == "poisson":
        return 1 + rng.poisson(spec[1] - 1, n)
    if kind == "geometric":
        return rng.geometric(1 / spec[1], n)
    raise ValueError(f"unknown rounds spec {spec}")


def text_tokens(rng: np.random.Generator, component: Component, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Text tokens of n records of one component (ChatML frame included), and their round counts."""
    rounds = draw_rounds(rng, component.rounds, n)
    starts = np.concatenate([[0], np.cumsum(rounds)[:-1]])
    question = draw_words(rng, component.question, int(rounds.sum())) + component.prompt_words
    answer = draw_words(rng, component.answer, int(rounds.sum()))
    if component.last_answer is not None:
        answer[starts + rounds - 1] = draw_words(rng, component.last_answer, n)
    per_round = (np.rint(TOKENS_PER_WORD * (question + answer)) + 2 * CHATML_TOKENS_PER_MESSAGE
                 + component.extra_tokens)
    return np.add.reduceat(per_round, starts).astype(np.int64), rounds


def draw_lengths(mix: str, samples: int, seed: int, num_query_tokens: int, max_length: int) -> dict:
    """Seeded lengths (text tokens + images x num_query_tokens, capped at max_length) with their components."""
    components = MIXES[mix]
    rng = np.random.default_rng(seed)
    weights = np.array([c.records for c in components], dtype=np.float64)
    which = rng.choice(len(components), size=samples, p=weights / weights.sum())
    lengths = np.zeros(samples, dtype=np.int64)
    images = np.zeros(samples, dtype=np.int64)
    rounds = np.zeros(samples, dtype=np.int64)
    for i, component in enumerate(components):
        rows = np.flatnonzero(which == i)
        if len(rows):
            tokens, rounds[rows] = text_tokens(rng, component, len(rows))
            images[rows] = component.images
            lengths[rows] = tokens + component.images * num_query_tokens
    return {"lengths": np.minimum(lengths, max_length), "uncapped": lengths, "which": which, "images": images,
            "rounds": rounds, "components": components}


def padding(lengths: np.ndarray, batches: list[list[int]]) -> dict:
    """Positions of the batches padded to their longest member, the real tokens among them, and the largest batch."""
    padded = [len(batch) * int(lengths[batch].max()) for batch in batches]
    tokens = sum(int(lengths[batch].sum()) for batch in batches)
    return {"positions": sum(padded), "tokens": tokens, "batches": len(batches), "max_positions": max(padded),
            "fraction": 1 - tokens / sum(padded)}


def consecutive(order: list[int], batch: int) -> list[list[int]]:
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def two_process_batches(order: list[int], batch: int) -> list[list[int]]:
    """The batches both processes of a 2-process Trainer run see: accelerate deals out whole batches of one order."""
    return [b for rank in range(2)
            for b in BatchSamplerShard(BatchSampler(order, batch, drop_last=False), num_processes=2,
                                       process_index=rank)]


def distributed_sampler_batches(lengths: list[int], batch: int, sampler_batch: int, seed: int) -> list[list[int]]:
    batches = []
    for rank in range(2):
        sampler = DistributedLengthGroupedSampler(sampler_batch, num_replicas=2, rank=rank, seed=seed, lengths=lengths)
        batches += consecutive(list(sampler), batch)
    return batches


def measure(lengths: np.ndarray, batch: int, seed: int, grad_accum: int = 1) -> dict:
    """The sampler groups at batch x grad_accum, as the Trainer builds it; the batches themselves hold `batch`."""
    as_list, sampler_batch = lengths.tolist(), batch * grad_accum
    random_order = torch.randperm(len(as_list), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped_order = list(LengthGroupedSampler(sampler_batch, lengths=as_list,
                                              generator=torch.Generator().manual_seed(seed)))
    sorted_order = np.argsort(-lengths, kind="stable").tolist()
    random = padding(lengths, consecutive(random_order, batch))
    grouped = padding(lengths, consecutive(grouped_order, batch))
    return {
        "batch": batch,
        "grad_accum": grad_accum,
        "sampler_batch": sampler_batch,
        "mega_batch_mult": max(min(len(as_list) // (4 * sampler_batch), 50), 1),
        "padding_fraction_random": random["fraction"],
        "padding_fraction_grouped": grouped["fraction"],
        "padding_ratio": grouped["fraction"] / random["fraction"] if random["fraction"] else 1.0,
        "padding_fraction_sorted": padding(lengths, consecutive(sorted_order, batch))["fraction"],
        "tokens_per_batch": random["tokens"] / random["batches"],
        "positions_per_batch_random": random["positions"] / random["batches"],
        "positions_per_batch_grouped": grouped["positions"] / grouped["batches"],
        "positions_ratio": grouped["positions"] / random["positions"],
        "max_positions_per_batch_random": random["max_positions"],
        "max_positions_per_batch_grouped": grouped["max_positions"],
        "batches": random["batches"],
        "padding_fraction_random_2proc": padding(lengths, two_process_batches(random_order, batch))["fraction"],
        "padding_fraction_grouped_2proc": padding(lengths, two_process_batches(grouped_order, batch))["fraction"],
        "padding_fraction_grouped_2proc_distributed_sampler":
            padding(lengths, distributed_sampler_batches(as_list, batch, sampler_batch, seed))["fraction"],
    }


def describe(drawn: dict, opts) -> dict:
    lengths, which = drawn["lengths"], drawn["which"]
    parts = {}
    for i, component in enumerate(drawn["components"]):
        rows = which == i
        if rows.any():
            parts[component.name] = {"share": float(rows.mean()), "mean_length": float(lengths[rows].mean()),
                                     "mean_rounds": float(drawn["rounds"][rows].mean())}
    return {
        "case": "padding/lengths", "mix": opts.mix, "samples": opts.samples, "seed": opts.seed,
        "num_query_tokens": opts.num_query_tokens, "max_length": opts.max_length,
        "mean": float(lengths.mean()), "median": float(np.median(lengths)),
        **{f"p{q}": float(np.percentile(lengths, q)) for q in (10, 90, 99)},
        "min": int(lengths.min()), "max": int(lengths.max()),
        "text_only_share": float((drawn["images"] == 0).mean()),
        "capped_share": float((drawn["uncapped"] > opts.max_length).mean()),
        "components": parts,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20_000, help="synthetic conversations")
    p.add_argument("--seed", type=int, default=0, help="seeds the lengths and both orders")
    p.add_argument("--batch-sizes", default="8,16,32", help="comma-separated per-device batch sizes")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="gradient accumulation steps: the Trainer gives the sampler batch x this")
    p.add_argument("--mix", choices=sorted(MIXES), default="llava_v1_5_mix665k")
    p.add_argument("--num-query-tokens", type=int, default=32, help="visual tokens per image")
    p.add_argument("--max-length", type=int, default=2048, help="lengths are capped here, as truncation does")
    opts = p.parse_args(argv)
    batch_sizes = [int(b) for b in opts.batch_sizes.split(",")]
    if min(batch_sizes) < 1 or opts.grad_accum < 1 or opts.samples < 2 * max(batch_sizes) * opts.grad_accum:
        p.error("--samples must be at least 2 x the largest batch size x --grad-accum; sizes at least 1")
    drawn = draw_lengths(opts.mix, opts.samples, opts.seed, opts.num_query_tokens, opts.max_length)
    summary = describe(drawn, opts)
    print(json.dumps(summary), flush=True)
    results = [summary]
    for batch in batch_sizes:
        result = {"case": f"padding/batch{batch}", "mix": opts.mix, "samples": opts.samples, "seed": opts.seed,
                  **measure(drawn["lengths"], batch, opts.seed, opts.grad_accum)}
        print(json.dumps(result), flush=True)
        results.append(result)

    log(f"{opts.mix}: {opts.samples} conversations, seed {opts.seed}, gradient accumulation {opts.grad_accum}, "
        f"{100 * summary['text_only_share']:.1f}% "
        f"text-only; length mean {summary['mean']:.0f}, median {summary['median']:.0f}, p90 {summary['p90']:.0f}, "
        f"max {summary['max']} tokens ({opts.num_query_tokens} per image, capped at {opts.max_length})")
    log("batch | padding random  grouped  ratio  sorted | positions/batch random  grouped | tokens/batch | "
        "2 procs random  grouped  dist. sampler")
    for r in results[1:]:
        log(f"{r['batch']:>5} | {r['padding_fraction_random']:>14.3f} {r['padding_fraction_grouped']:>8.3f} "
            f"{r['padding_ratio']:>6.3f} {r['padding_fraction_sorted']:>7.3f} | "
            f"{r['positions_per_batch_random']:>22.0f} {r['positions_per_batch_grouped']:>8.0f} | "
            f"{r['tokens_per_batch']:>12.0f} | {r['padding_fraction_random_2proc']:>14.3f} "
            f"{r['padding_fraction_grouped_2proc']:>8.3f} "
            f"{r['padding_fraction_grouped_2proc_distributed_sampler']:>14.3f}")
    return results


if __name__ == "__main__":
    main()
