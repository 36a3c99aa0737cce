"""Runs many `python -m module args` command lines, each in a process of its own, paying the imports once.

Usage: python tests/cli/forked_commands.py SPEC.json RESULTS.json, where SPEC.json is `{"name": ["-m", module,
*args], ...}`; each process's output is kept in a `forked-logs` folder beside RESULTS.json. Starting an interpreter
that imports torch and transformers takes ~5 CPU-seconds here, and the command-line mistakes are ~40 such starts.
This process imports the third-party libraries the entry points use, then forks one child per command line: the
child runs the module as `python -m` does (runpy, as `__main__`, with sys.argv set), its stdout and stderr going to
files, and ends with the exit status an interpreter would give (the SystemExit code, or 1 with the traceback printed
for an uncaught exception). What the imports themselves printed is recorded under `"imports"`: a user's interpreter
would print it before any error line.
"""

import json
import logging
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

# What the entry points import that takes seconds; our own modules stay unimported, so that each child imports
# its entry module afresh (runpy warns about a module found in sys.modules before it runs as __main__).
THIRD_PARTY = ("torch", "transformers", "transformers.modeling_utils", "transformers.trainer", "accelerate",
               "datasets", "peft", "PIL.Image", "matplotlib.pyplot", "safetensors.torch", "yaml")
PARALLEL = 2
TIMEOUT_S = 300


def redirect(stdout: str, stderr: str) -> None:
    """Points file descriptors 1 and 2 (and so sys.stdout and sys.stderr) at the two files."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)


def run_child(command: list[str]) -> int:
    """In the forked child: `python -m module args` to its end; returns the exit status."""
    assert command[0] == "-m", command
    sys.argv = [command[1], *command[2:]]
    try:
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as stop:
        code = stop.code
        status = 0 if code is None else code if isinstance(code, int) else 1
        if not isinstance(code, (int, type(None))):
            print(code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (what the interpreter itself does with an uncaught exception)
        traceback.print_exc()
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def main(spec_path: str, results_path: str) -> None:
    commands = json.loads(Path(spec_path).read_text())
    logs = Path(results_path).parent / "forked-logs"
    logs.mkdir(exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    redirect(str(logs / "imports.out"), str(logs / "imports.err"))
    for name in THIRD_PARTY:
        __import__(name)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)

    pending, running, results = list(enumerate(commands.items())), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            number, (name, command) = pending.pop(0)
            out, err = str(logs / f"{number}.out"), str(logs / f"{number}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                redirect(out, err)
                os._exit(run_child(command))
            running[pid] = (name, out, err, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for child, (_, _, _, started) in running.items():
                if time.monotonic() - started > TIMEOUT_S:
                    os.kill(child, 9)
            time.sleep(0.05)
            continue
        name, out, err, _ = running.pop(pid)
        results[name] = {"returncode": os.waitstatus_to_exitcode(status), "stdout": Path(out).read_text(),
                         "stderr": Path(err).read_text()}
    imports = {"stdout": (logs / "imports.out").read_text(), "stderr": (logs / "imports.err").read_text()}
    Path(results_path).write_text(json.dumps({"imports": imports, "commands": results}))


if __name__ == "__main__":
    main(*sys.argv[1:])
