"""Loader throughput: decoded, preprocessed training pairs per second, and per CPU core, from shards.

    python -m benchmarks.dataloading                       # stages 1 and 2, float and uint8 pixels, workers 0/1/2
    python -m benchmarks.dataloading --workers 0,4,8 --samples 4096 --image-size 384
    python -m benchmarks.dataloading --sources map,stream --samples 200000 --workers 2   # streaming vs map-style

Writes synthetic shapes shards (`data.synthetic`), opens them with the project's loader
(`data.loading.load_image_text_dataset`) and drives a torch `DataLoader` with the training scripts' collators and an
image processor resizing to 224 px, as the base preset does. One JSON line per configuration on stdout. Compare
`pairs_per_s_per_core` x the cores you give the loader with the GPU's pairs/s from benchmarks/throughput.py.
Needs `datasets` (not installed on the GPU box: run it on any machine with the project's environment).
"""

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import BlipProcessor
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from cli.streams import stdout_to_stderr
from data.loading import load_image_text_dataset
from data.streaming import ShardStream
from data.synthetic import generate_dataset
from modeling.presets import CHAT_WORDS
from modeling.processing_vlm import VLMProcessor
from modeling.tiny_tokenizers import train_chat_tokenizer, train_wordpiece_tokenizer
from training.collators import ContrastiveCollator
from training.conversation_collator import ConversationCollator
from training.stage import text_corpus


def make_collators(dataset, image_size: int, num_query_tokens: int) -> dict:
    """Stage-1 and stage-2 collator factories (by pixel format) with tokenizers trained on the shards' text."""
    corpus = text_corpus(dataset)
    image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    qformer_processor = BlipProcessor(image_processor, train_wordpiece_tokenizer(corpus, vocab_size=1000))
    vlm_processor = VLMProcessor(
        image_processor=image_processor,
        tokenizer=train_chat_tokenizer([*corpus, *CHAT_WORDS], vocab_size=800),
        qformer_tokenizer=qformer_processor.tokenizer,
        num_query_tokens=num_query_tokens,
    )
    return {
        1: lambda fmt: ContrastiveCollator(qformer_processor, max_length=48, pixel_format=fmt),
        2: lambda fmt: ConversationCollator(vlm_processor, max_length=160, qa_turns=3, pixel_format=fmt),
    }


def measure(dataset, collator, workers: int, batch_size: int, batches: int) -> dict:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator)  # worker start-up and first-batch latency are not throughput
    start = time.perf_counter()
    pairs = 0
    for _ in range(batches):
        pairs += next(iterator)["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    del iterator
    return {"pairs": pairs, "seconds": round(seconds, 4), "pairs_per_s": pairs / seconds,
            "pairs_per_s_per_core": pairs / seconds / max(workers, 1)}


def source_case(source: str, shards: str, workers: int, batch_size: int, batches: int, image_size: int) -> dict:
    """One loader from cold, in this process: the map-style copy (`load_image_text_dataset`) or the stream
    (`ShardStream`). Time to the first training batch (the Arrow copy included), pairs/s after it, bytes written to
    the `datasets` cache (HF_DATASETS_CACHE, set by the caller), peak RSS of this process."""
    corpus = [row["caption"] for row in itertools.islice(ShardStream.from_source(shards, seed=0, buffer_size=1)
                                                          .text_rows(), 1000)]
    with stdout_to_stderr():
        tokenizer = train_wordpiece_tokenizer(corpus, vocab_size=1000)
    processor = BlipProcessor(ViTImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer)
    collator = ContrastiveCollator(processor, max_length=48, pixel_format="uint8")
    start = time.perf_counter()
    if source == "map":
        dataset = load_image_text_dataset(shards, split="train")
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator, shuffle=True,
                            drop_last=True, generator=torch.Generator().manual_seed(0))
    else:
        loader = DataLoader(ShardStream.from_source(shards, seed=0, buffer_size=10_000), batch_size=batch_size,
                            num_workers=workers, collate_fn=collator)
    iterator = iter(loader)
    next(iterator)
    first_batch_s = time.perf_counter() - start
    start, pairs = time.perf_counter(), 0
    for _ in range(batches):
        pairs += next(iterator)["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    written = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    peak_rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return {"case": f"dataload/{source}/workers{workers}", "source": source, "workers": workers, "batch": batch_size,
            "image_size": image_size, "first_batch_s": round(first_batch_s, 2), "pairs_per_s": pairs / seconds,
            "pairs_per_s_per_core": pairs / seconds / max(workers, 1), "cache_bytes_written": written,
            "peak_rss_mb": round(peak_rss / 1024), "cpu_count": os.cpu_count()}


def compare_sources(opts, shards: str) -> list[dict]:
    """Each source in a fresh process with an empty cache of its own: cold start, disk and RSS are its own."""
    results = []
    for source, workers in itertools.product(opts.sources.split(","), (int(w) for w in opts.workers.split(","))):
        print(f"{source}, {workers} workers ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as cache:
            command = [sys.executable, "-m", "benchmarks.dataloading", "--source-case", source, "--shards", shards,
                       "--workers", str(workers), "--batch-size", str(opts.batch_size), "--batches",
                       str(opts.batches), "--image-size", str(opts.image_size)]
            child = subprocess.run(command, env={**os.environ, "HF_DATASETS_CACHE": cache}, check=True,
                                   stdout=subprocess.PIPE, text=True)
        result = {**json.loads(child.stdout.splitlines()[-1]), "samples": opts.samples,
                  "source_size": opts.source_size}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024, help="synthetic pairs to write")
    p.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--image-size", type=int, default=224, help="side the image processor resizes to")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=4, help="timed batches per configuration")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--pixel-formats", default="float,uint8")
    p.add_argument("--num-query-tokens", type=int, default=32)
    p.add_argument("--sources", default=None,
                   help="instead of the collator cases: compare loaders, e.g. map,stream (stage 1, uint8 pixels)")
    p.add_argument("--shards", default=None, help="with --sources: an existing shard folder instead of new ones")
    p.add_argument("--source-case", default=None, help=argparse.SUPPRESS)  # one loader, in the child process
    opts = p.parse_args(argv)
    if opts.source_case:
        result = source_case(opts.source_case, opts.shards, int(opts.workers), opts.batch_size, opts.batches,
                             opts.image_size)
        print(json.dumps(result), flush=True)
        return [result]
    if opts.sources and opts.shards:
        return compare_sources(opts, opts.shards)
    needed = opts.batch_size * (opts.batches + 1)
    if opts.samples < needed:
        p.error(f"--samples must be at least batch_size x (batches + 1) = {needed}")
    results = []
    with tempfile.TemporaryDirectory() as shards:
        generate_dataset(shards, {"train": opts.samples}, image_size=opts.source_size, samples_per_shard=512,
                         num_proc=1)
        if opts.sources:
            return compare_sources(opts, os.path.join(shards, "train"))
        dataset = load_image_text_dataset(shards, split="train")
        with stdout_to_stderr():
            collators = make_collators(dataset, opts.image_size, opts.num_query_tokens)
        for stage in (int(s) for s in opts.stages.split(",")):
            for fmt in opts.pixel_formats.split(","):
                for workers in (int(w) for w in opts.workers.split(",")):
                    print(f"stage {stage}, {fmt} pixels, {workers} workers ...", file=sys.stderr, flush=True)
                    result = {
                        "case": f"dataload/stage{stage}/{fmt}/workers{workers}", "stage": stage,
                        "pixel_format": fmt, "workers": workers, "batch": opts.batch_size,
                        "image_size": opts.image_size, "source_size": opts.source_size, "cpu_count": os.cpu_count(),
                        **measure(dataset, collators[stage](fmt), workers, opts.batch_size, opts.batches),
                    }
                    print(json.dumps(result), flush=True)
                    results.append(result)
    return results


if __name__ == "__main__":
    main()
