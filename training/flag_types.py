"""argparse ``type=`` callables that range-check numeric flags at parse time, with the reason.

``argparse`` prefixes the message with the flag (``argument --lr: must be > 0, got -0.001``), and the
run stops before anything is loaded. :func:`join_negative_values` lets ``--lr -1e-3`` reach the check
(argparse would otherwise take ``-1e-3`` for an option and say "expected one argument").
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable, List, Optional, Sequence

_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf(inity)?|-nan", re.IGNORECASE)


def int_flag(low: Optional[int] = None, high: Optional[int] = None, multiple_of: Optional[int] = None,
             why: str = "") -> Callable[[str], int]:
    """An int in ``[low, high]`` (and a multiple of ``multiple_of``); ``why`` is appended to errors."""
    reason = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}{reason}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}{reason}")
        if multiple_of is not None and value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {value}{reason}")
        return value

    parse.__name__ = "int"
    return parse


def float_flag(low: Optional[float] = None, low_inclusive: bool = True, why: str = "") -> Callable[[str], float]:
    """A finite float ``>= low`` (or ``> low`` with ``low_inclusive=False``)."""
    reason = f" ({why})" if why else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low if low_inclusive else value <= low):
            op = ">=" if low_inclusive else ">"
            raise argparse.ArgumentTypeError(f"must be {op} {low:g}, got {value:g}{reason}")
        return value

    parse.__name__ = "float"
    return parse


def join_negative_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> List[str]:
    """Rewrite ``--flag -1e-3`` as ``--flag=-1e-3`` for single-value flags, so that argparse hands the
    value to the flag's type check instead of mistaking it for an option."""
    single = {s for a in parser._actions if a.option_strings and a.nargs is None and a.type is not None
              for s in a.option_strings}
    out: List[str] = []
    for token in argv:
        if out and out[-1] in single and _NEGATIVE_NUMBER.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out
