"""Command-line parsing whose mistakes are one line: argparse parsers that raise `UserError`, and count types.

argparse prints its usage and exits on a bad flag; here the parsers raise instead, so `run_command` prints one
line that names the flag (with the nearest known one for a misspelling) and points to `--help`.
"""

import argparse
import difflib
from collections.abc import Iterable

from .errors import UserError


def closest(name: str, choices: Iterable[str]) -> str:
    """` (did you mean X?)` for the nearest of `choices` to `name`, or an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


class OneLineErrors:
    """Mixin for `argparse.ArgumentParser` subclasses: `error` raises `UserError` instead of exiting."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            message = unknown_flags_message(message.split(":", 1)[1].split(), self._option_string_actions)
        raise UserError(f"{message}; `{self.prog} --help` lists the options")


def unknown_flags_message(arguments: list[str], known: Iterable[str]) -> str:
    """`unknown option --max_step (did you mean --max_steps?)` for the flags among `arguments`."""
    known = [k for k in known if k.startswith("--")]
    flags = [a.split("=", 1)[0] for a in arguments if a.startswith("-")] or arguments
    return "; ".join(f"unknown option {flag}{closest(flag, known)}" for flag in flags)


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line errors (see `run_command`) and exact option names only (argparse
    would otherwise take a prefix such as `--train` for `--train-size`, and a typo for another option)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def count(minimum: int):
    """An argparse `type` for whole numbers of at least `minimum`: `--train -5` names the flag and the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"count >= {minimum}"
    return parse


positive_int = count(1)
non_negative_int = count(0)


def check_at_least(values: dict[str, int | float | None], minimum: int | float, where: str = "") -> None:
    """Raises `UserError` naming the first of `values` (name -> value, None meaning unset) below `minimum`."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise UserError(f"{where}{name} must be at least {minimum}, got {value}")


__all__ = [
    "ArgumentParser", "OneLineErrors", "check_at_least", "closest", "count", "non_negative_int", "positive_int",
    "unknown_flags_message",
]
