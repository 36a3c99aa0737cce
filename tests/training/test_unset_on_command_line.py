"""`none` / `null` on the command line unset an optional field a YAML preset set; other fields keep their types."""

import pytest

from cli import UserError
from tests.helpers import REPO
from training.arguments import DataArguments, QFormerModelArguments, TrainingArguments, parse_args

STAGE1 = str(REPO / "configs/tiny/stage1.yaml")
ARGUMENTS = (QFormerModelArguments, DataArguments, TrainingArguments)


def test_the_presets_columns_are_unset_by_none_and_null():
    _, data, _ = parse_args(ARGUMENTS, [STAGE1])
    assert data.caption_column == "caption_color_first"  # what the preset names: shards' .json field
    _, data, _ = parse_args(ARGUMENTS, [STAGE1, "--caption_column", "none", "--negative_captions_column", "NULL",
                                        "--max_eval_samples", "Null"])
    assert (data.caption_column, data.negative_captions_column, data.max_eval_samples) == (None, None, None)


def test_other_values_of_an_optional_field_keep_their_type():
    _, data, _ = parse_args(ARGUMENTS, [STAGE1, "--max_eval_samples", "12", "--caption_column", "nonesuch"])
    assert (data.max_eval_samples, data.caption_column) == (12, "nonesuch")
    with pytest.raises(UserError, match="--max_eval_samples.*invalid int value: 'abc'"):
        parse_args(ARGUMENTS, [STAGE1, "--max_eval_samples", "abc"])


def test_a_field_that_cannot_be_unset_refuses_none():
    with pytest.raises(UserError, match="--max_caption_length.*invalid int value: 'none'"):
        parse_args(ARGUMENTS, [STAGE1, "--max_caption_length", "none"])


def test_training_arguments_keep_transformers_reading():
    # For transformers, `--report_to none` is a value (no integrations), not an unset field.
    _, _, training = parse_args(ARGUMENTS, [STAGE1, "--report_to", "none"])
    assert training.report_to == []
