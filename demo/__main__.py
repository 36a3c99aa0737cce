"""`python -m demo`: see `demo.pipeline`."""

from cli import run_command

from .pipeline import main

if __name__ == "__main__":
    run_command(main)
