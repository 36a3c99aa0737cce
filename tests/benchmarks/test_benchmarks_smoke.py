"""The benchmark scripts run end to end on CPU at tiny sizes and print well-formed JSON lines (no timing asserted)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

THROUGHPUT_KEYS = {"case", "device", "batch", "pairs_per_s", "tokens_per_s", "flop_util", "peak_mem_gib",
                   "flops_per_step", "loss", "sizes"}


# Slow tier (`make test`, not `make test-fast`): runs every benchmark script.
pytestmark = pytest.mark.slow


def run_json_lines(module: str, *args: str) -> list[dict]:
    # One thread: the cores are shared with other test processes, and oversubscribed OpenMP threads crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds nothing but the results


def assert_finite_numbers(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value) and value >= 0, (result["case"], key, value)


def test_throughput_smoke_on_cpu():
    results = run_json_lines("benchmarks.throughput", "--tiny", "--device", "cpu")
    assert [r["case"] for r in results] == [
        "stage1/original", "stage1/ours_vit", "stage1/ours_cached", "stage2/original", "stage2/ours", "stage2/ours_b4",
    ]
    for result in results:
        assert THROUGHPUT_KEYS <= result.keys(), result["case"]
        assert_finite_numbers(result)
        assert result["device"] == "cpu" and result["sizes"] == "tiny" and "smoke check" in result["note"]
        assert result["pairs_per_s"] > 0 and result["flops_per_step"] > 0
        assert ("ratio_vs_original" in result) == (not result["case"].endswith("/original"))
    by_case = {r["case"]: r for r in results}
    # The switches did what they say: the cache skips the ViT's FLOPs, label-only logits the LM head's.
    per_pair = {c: by_case[c]["flops_per_step"] / by_case[c]["batch"] for c in by_case}
    assert per_pair["stage1/ours_cached"] < per_pair["stage1/ours_vit"]
    assert per_pair["stage2/ours"] < per_pair["stage2/original"]
    assert not by_case["stage2/original"]["bf16"] and by_case["stage2/ours"]["label_logits_only"]


def test_throughput_switches_turn_optimisations_off():
    results = run_json_lines("benchmarks.throughput", "--tiny", "--device", "cpu", "--no-bf16", "--no-cache",
                             "--no-label-logits-only", "--no-uint8", "--gradient-checkpointing",
                             "--cases", "stage2/ours")
    [ours] = results
    assert ours["case"] == "stage2/ours" and ours["vision"] == "pixels" and not ours["bf16"]
    assert not ours["label_logits_only"] and ours["gradient_checkpointing"]
    assert "ratio_vs_original" not in ours  # its stage's original was not run
    assert_finite_numbers(ours)


def test_dataloading_smoke_on_cpu():
    results = run_json_lines("benchmarks.dataloading", "--samples", "12", "--batch-size", "4", "--batches", "2",
                             "--workers", "0,1", "--image-size", "32", "--source-size", "48")
    assert len(results) == 8  # 2 stages x 2 pixel formats x 2 worker counts
    for result in results:
        assert_finite_numbers(result)
        assert result["pairs"] == 8 and result["pairs_per_s_per_core"] > 0


PADDING_KEYS = {"case", "batch", "padding_fraction_random", "padding_fraction_grouped", "padding_ratio",
                "padding_fraction_sorted", "tokens_per_batch", "positions_per_batch_random",
                "positions_per_batch_grouped", "padding_fraction_random_2proc", "padding_fraction_grouped_2proc",
                "padding_fraction_grouped_2proc_distributed_sampler"}


def test_padding_smoke():
    # 1600 is a multiple of every batch size, so the whole set sorted is a floor for any order. Grouped is the same
    # seeded permutation with each megabatch sorted, which cannot add padding inside a megabatch; only the swap of
    # the longest conversation into the first batch could, far less than this seed's margin.
    args = ("--samples", "1600", "--batch-sizes", "8,16,32", "--seed", "0")
    summary, *rows = run_json_lines("benchmarks.padding", *args)
    assert summary["case"] == "padding/lengths" and summary["samples"] == 1600
    assert 0 < summary["text_only_share"] < 1 and summary["min"] < summary["median"] < summary["max"] <= 2048
    assert [r["batch"] for r in rows] == [8, 16, 32]
    for r in rows:
        assert PADDING_KEYS <= r.keys(), r["case"]
        assert_finite_numbers(r)
        assert r["padding_fraction_sorted"] <= r["padding_fraction_grouped"] < r["padding_fraction_random"] < 1
        assert r["padding_fraction_grouped_2proc"] < r["padding_fraction_random_2proc"]
        assert r["tokens_per_batch"] <= r["positions_per_batch_grouped"] < r["positions_per_batch_random"]
    # Seeded: the same arguments give the same figures in this process too.
    from benchmarks.padding import main

    assert main(list(args)) == [summary, *rows]


@pytest.mark.parametrize("script", ["throughput", "dataloading", "padding", "instruction_cost"])
def test_a_benchmark_runs_as_a_file_too(script):
    # `python benchmarks/x.py` puts benchmarks/ first on the path, not the repository: what a benchmark imports
    # must come from the installed project.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
