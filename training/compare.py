"""Paper-style table of finished runs: ours beside the paper's Table 1, with bits/token.

    python training/compare.py runs/vq-ema runs/fsq runs/lfq runs/rfsq2-* runs/rfsq4-* [--out table.md]

Reads RUN_DIR/results.json of each run; prints a Markdown table and writes it to --out
(default: runs/compare.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rfsq_kernels.output_claim import claim_output
from training.presets import PAPER_BITS, PAPER_TABLE1

_ORDER = list(PAPER_TABLE1)


def _fmt(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _paper(r: dict) -> dict:
    """The paper's row for a result, or ``{}`` when the run is not that configuration (its preset is
    custom, or its bits/token differ from the paper's, e.g. a results.json of an older version that
    labelled ``--preset vq-ema --n-embed 64`` as VQ-EMA)."""
    p = r.get("paper") or {}
    if p and PAPER_BITS.get(r["preset"]) != r["bits_per_token"]:
        return {}
    return p


def _method(r: dict) -> str:
    p = r.get("paper") or {}
    if _paper(r):
        return p["name"]
    if p:
        return f"custom ({r['bits_per_token']:.1f} bits/token, not the paper's {p['name']})"
    return f"custom ({r.get('quantizer', '?')}, {r['bits_per_token']:.1f} bits/token)"


def load_results(run_dirs: List[str]) -> List[dict]:
    """``results.json`` of each run dir (skipping, with a warning, dirs that have none)."""
    out = []
    for d in run_dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            print(f"warning: {path} not found (run unfinished?), skipped", file=sys.stderr)
            continue
        with open(path) as f:
            r = json.load(f)
        r["run_dir"] = d
        out.append(r)
    out.sort(key=lambda r: (_ORDER.index(r["preset"]) if r["preset"] in _ORDER else len(_ORDER), r["run_dir"]))
    return out


def markdown_table(results: List[dict]) -> str:
    """The comparison table as Markdown (L1 in the normalized space, LPIPS-VGG, PSNR in dB on [0, 1])."""
    lines = [
        "| run | method | bits/token | L1 ↓ | LPIPS ↓ | PSNR ↑ | paper L1 | paper LPIPS | paper PSNR | steps | data |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v, name, p = r["val"], _method(r), _paper(r)
        lines.append(
            f"| {os.path.basename(os.path.normpath(r['run_dir']))} | {name} | {r['bits_per_token']:.1f} | "
            f"{_fmt(v['l1'], 3)} | {_fmt(v['lpips'], 3)} | {_fmt(v['psnr'], 1)} | {_fmt(p.get('l1'), 3)} | "
            f"{_fmt(p.get('lpips'), 3)} | {_fmt(p.get('psnr'), 1)} | {r['steps']} | {r['data']} |")
    lines.append("")
    lines.append("Paper: ImageNet 128x128 val after 50 epochs on 16 GPUs (Table 1). The paper says every method "
                 "uses 12 bits; its configurations use the bits/token shown. Runs on other data or "
                 "fewer steps are not comparable to the paper's numbers.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=os.path.join("runs", "compare.md"),
                   help="Markdown file to write (default runs/compare.md)")
    args = p.parse_args(argv)
    tmp = claim_output(p, "--out", args.out, make_dirs=True)  # an unwritable --out is refused before anything is read
    try:
        results = load_results(args.run_dirs)
        if not results:
            print("no results.json found in the given run directories", file=sys.stderr)
            return 1
        table = markdown_table(results)
        print(table)
        with open(tmp, "w") as f:
            f.write(table)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
