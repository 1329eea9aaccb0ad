"""Standard JSON out (no ``Infinity``/``NaN``), atomic writes, and JSON-lines reading that survives a
run killed in the middle of writing its last line."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, List

log = logging.getLogger("rfsq.train")


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON ``null``), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Standard JSON text: non-finite floats become ``null`` (never ``Infinity``/``NaN``)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, fsync, then ``os.replace`` (atomic)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk: say which file; the previous one is untouched
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; the previous file (if any) is "
                      "unchanged") from e


def write_json_atomic(path: str, obj: Any) -> None:
    """:func:`dumps` ``obj`` (indented) to ``path`` atomically."""
    write_text_atomic(path, dumps(obj, indent=1) + "\n")


def read_jsonl(path: str) -> List[dict]:
    """Rows of a JSON-lines file (missing file -> ``[]``).

    A torn last line (the writer was killed mid-line) is dropped with a warning naming the file; an
    unparsable line elsewhere raises ``ValueError`` naming the file and line.
    """
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):  # the last line, its newline never written
                log.warning("%s: ignoring an incomplete last line %d (%r): the run was interrupted while "
                            "writing it", path, number, line[:80])
                break
            raise ValueError(f"{path}, line {number} is not valid JSON ({e.msg}): {line[:80]!r}") from None
    return rows
