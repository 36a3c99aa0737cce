"""Running the real training scripts in subprocesses, and reading back what they wrote.

Every run is a fresh interpreter (`python -m training.train_qformer ...`, or torchrun for two processes), the way a
user launches it. Models are shrunk on the command line; everything else comes from configs/tiny/*.yaml.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
STAGE1_YAML = REPO / "configs/tiny/stage1.yaml"
STAGE2_YAML = REPO / "configs/tiny/stage2.yaml"
TIMEOUT_S = 240

# Sizes small enough that a step takes milliseconds; dropout stays on (resume must restore the RNG streams), and
# transformers' initialisation (std 0.02) rather than the tiny preset's wider one.
SMALL_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 64, "initializer_range": 0.02}
SMALL_QFORMER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                 "cross_attention_frequency": 1, "max_position_embeddings": 64, "initializer_range": 0.02,
                 "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
SMALL_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2}

# At the random initialisation (std 0.02) the small Q-Former's caption and query outputs hardly depend on their
# input, and with the layers' default dropout of 0.1 a run sits at the chance loss ln(batch) for far more than a
# few dozen steps. A wider initialisation and no dropout make the loss leave chance within the steps a test affords.
LEARNABLE = {"initializer_range": 0.2}
LEARNABLE_QFORMER = {**LEARNABLE, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

# The stage-1 run the two-stage and stage-2 tests share (conftest.trained_stage1).
STAGE1_STEPS, STAGE1_BATCH = 40, 32


def stage1_args(data: Path, output_dir: Path, **overrides) -> list[str]:
    """configs/tiny/stage1.yaml with the small model and a short run; `overrides` replace any field."""
    fields = {
        "train_data": data, "eval_data": data, "output_dir": output_dir,
        "vision_config": SMALL_VISION, "qformer_config": SMALL_QFORMER,
        # 4 queries on a 4x4 patch grid: the preset's 3x3 regional queries (isolated) do not fit the small model.
        "num_query_tokens": 4, "regional_queries": 0, "isolate_regional_queries": False, "embed_dim": 32,
        "text_vocab_size": 300,
        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "max_eval_samples": 64,
        "learning_rate": 1e-3, "warmup_steps": 2, "logging_steps": 1, "disable_tqdm": True,
        **overrides,
    }  # fmt: skip
    return [str(STAGE1_YAML), *as_cli(fields)]


def stage2_args(data: Path, qformer: Path, output_dir: Path, **overrides) -> list[str]:
    """configs/tiny/stage2.yaml on the stage-1 folder `qformer`, with a small LM and a short run."""
    fields = {
        "train_data": data, "eval_data": data, "output_dir": output_dir, "qformer_name_or_path": qformer,
        "lm_config": SMALL_LM, "lm_vocab_size": 300, "qa_turns": 1,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "max_eval_samples": 16,
        "learning_rate": 1e-3, "warmup_steps": 2, "logging_steps": 1, "disable_tqdm": True,
        # float32: these runs check mechanics (processes, resumption, sharding) to float32 tolerances.
        "bf16": False,
        **overrides,
    }  # fmt: skip
    return [str(STAGE2_YAML), *as_cli(fields)]


def as_cli(fields: dict) -> list[str]:
    """`{"max_steps": 4, "lm_config": {...}}` -> `["--max_steps", "4", "--lm_config", "{...}"]`."""
    args = []
    for name, value in fields.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        args += [f"--{name}", str(value)]
    return args


def script_env() -> dict[str, str]:
    # One thread per process: two cores are shared with the other test processes, and oversubscribed OpenMP
    # threads made a step ~30x slower here. PYTHONFAULTHANDLER: a worker that dies of a signal (a SIGSEGV in a
    # collective, seen once under load) prints its Python stack into the log instead of only torchrun's exit code.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}


def start(module: str, args: list[str], log: Path) -> subprocess.Popen:
    """Starts `python -m module args` with its output going to `log`; the caller waits or kills it."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=script_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def run(module: str, args: list[str], log: Path) -> str:
    """Runs `python -m module args` to the end; returns its output, failing with the output's tail if it fails."""
    return finish(start(module, args, log), log)


def run_torchrun(target: list[str], log: Path, nproc: int = 2) -> str:
    """`torchrun --nproc_per_node nproc <target>` on CPU (gloo), where target is `["-m", module, *args]` or
    `[script, *args]`; returns the output of all processes."""
    # --standalone: a rendezvous on a port the OS picks at bind time, so two suites running torchrun at once can
    # never meet on a port one of them probed as free a moment earlier.
    command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *command], cwd=REPO, env=script_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return finish(process, log)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Sends `sig` to `pid` and all its descendants: torchrun starts each worker in a session of its own, so a
    signal to torchrun's process group does not reach them."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        kill_tree(int(child), sig)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.wait()
        raise AssertionError(f"{process.args} did not finish in {TIMEOUT_S}s:\n{log.read_text()[-6000:]}") from None
    output = log.read_text()
    if process.returncode != 0:
        # A rank that died of a signal left its stack (faulthandler) above the other ranks' errors: show both.
        crash = output.find("Fatal Python error")
        crashed = f"\nthe crashed process:\n{output[crash:crash + 4000]}" if crash >= 0 else ""
        raise AssertionError(f"{process.args} exited with {process.returncode}:\n{output[-6000:]}{crashed}")
    return output


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def logged_losses(folder: Path) -> list[tuple[int, float]]:
    """(step, training loss) of every logging step in `folder/trainer_state.json`."""
    return [(entry["step"], entry["loss"]) for entry in trainer_state(folder)["log_history"] if "loss" in entry]


def max_weight_difference(file_a: Path, file_b: Path, skip=lambda name: False) -> float:
    """Largest absolute difference between two safetensors files holding the same tensor names (`skip`: names
    left out)."""
    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())[:10]}"
    compared = [name for name in a if not skip(name)]
    assert compared, "no tensor left to compare"
    return max((a[name].float() - b[name].float()).abs().max().item() for name in compared)


def run_differences(run: Path, reference: Path, steps: int, label: str) -> tuple[float, float]:
    """Two runs of the same training (another launcher, engine or process count): the largest |loss difference| over
    their logged steps, which must be every step 1..`steps`, and the largest |weight difference| of their saved
    models, printed after `label`. Attention key biases are left out of the weights: they get no gradient in exact
    arithmetic (softmax ignores a constant added to a row's scores), so AdamW turns their rounding noise into full
    +-lr steps."""
    losses, reference_losses = logged_losses(run), logged_losses(reference)
    assert [step for step, _ in losses] == list(range(1, steps + 1))
    loss_difference = max(abs(a - b) for (_, a), (_, b) in zip(losses, reference_losses, strict=True))
    weight_difference = max_weight_difference(run / "model.safetensors", reference / "model.safetensors",
                                              skip=lambda name: name.endswith("attention.key.bias"))
    print(f"\n{label}: max |loss diff| = {loss_difference:.2e}, max |weight diff| after {steps} steps = "
          f"{weight_difference:.2e} (losses {losses} vs {reference_losses})")
    return loss_difference, weight_difference
