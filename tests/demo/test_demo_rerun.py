"""A demo run again in the same folder starts over, except a stage stopped mid-training by the same command: that
one keeps its checkpoint, which the stage resumes from (as its stop message says)."""

import json

from demo.pipeline import COMMAND_RECORD, clear_previous_outputs

STAGE1, STAGE2 = ["configs/tiny/stage1.yaml", "--seed", "0"], ["configs/tiny/stage2.yaml", "--seed", "0"]


def leftovers(out):
    """What a demo stopped by Ctrl-C in stage 1 leaves: stage 1's checkpoint, the untrained baselines."""
    checkpoint = out / "qformer" / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    (out / "untrained" / "qformer").mkdir(parents=True)
    (out / "vlm").mkdir()


def test_the_same_command_keeps_the_stopped_stages_checkpoint(tmp_path):
    clear_previous_outputs(tmp_path, STAGE1, STAGE2)  # the first run records its command lines
    leftovers(tmp_path)
    assert clear_previous_outputs(tmp_path, STAGE1, STAGE2) == ["qformer"]
    assert (tmp_path / "qformer" / "checkpoint-7").is_dir()
    assert not (tmp_path / "untrained").exists() and not (tmp_path / "vlm").exists()


def test_another_command_or_no_record_starts_over(tmp_path):
    clear_previous_outputs(tmp_path, STAGE1, STAGE2)
    leftovers(tmp_path)
    assert clear_previous_outputs(tmp_path, [*STAGE1[:-1], "1"], STAGE2) == []
    assert not (tmp_path / "qformer").exists()
    leftovers(tmp_path)
    (tmp_path / COMMAND_RECORD).unlink()
    assert clear_previous_outputs(tmp_path, [*STAGE1[:-1], "1"], STAGE2) == []
    assert not (tmp_path / "qformer").exists()
