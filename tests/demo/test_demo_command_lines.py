"""The demo's two training command lines: the precision it picks for this machine, and `--extra` winning over it."""

from pathlib import Path

import pytest

from demo.pipeline import parse_demo_args, stage_command_lines
from training.arguments import DataArguments, QFormerModelArguments, TrainingArguments, VLMModelArguments, parse_args


def _bf16(argv: list[str], bf16_in_hardware: bool) -> tuple[bool, bool]:
    """Whether each stage trains in bf16."""
    stage1, stage2 = stage_command_lines(parse_demo_args(argv), Path("outputs/x"), bf16_in_hardware)
    _, _, stage1_training = parse_args((QFormerModelArguments, DataArguments, TrainingArguments), stage1)
    _, _, stage2_training = parse_args((VLMModelArguments, DataArguments, TrainingArguments), stage2)
    return stage1_training.bf16, stage2_training.bf16


@pytest.mark.parametrize("bf16_in_hardware", [True, False])
def test_stage2_trains_in_bf16_only_where_the_hardware_multiplies_it(bf16_in_hardware):
    # Stage 1's preset trains in float32 on every machine.
    assert _bf16(["--seed", "3"], bf16_in_hardware) == (False, bf16_in_hardware)


def test_extra_overrides_the_demos_choice():
    # --extra goes to both stages.
    assert _bf16(["--extra", "--bf16", "true"], bf16_in_hardware=False) == (True, True)
    assert _bf16(["--stage2-steps", "7", "--extra", "--bf16", "false"], bf16_in_hardware=True) == (False, False)
