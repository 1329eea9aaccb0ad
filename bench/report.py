"""Benchmark report: time every case x backend x mode, print a table, save JSON + a log-log plot.

    python bench/report.py                 # GPU: full shapes; CPU: tiny shapes (--tiny is the CPU default)
    python bench/report.py --groups training large --modes fwdbwd --backends fused compile_cudagraphs

GPU times: median of ``triton.testing.do_bench`` with a sync at the start of each timed call (host
overhead counted), plus the plain events-only do_bench median in the JSON. CPU times: wall-clock
medians; not GPU numbers. Every backend is gated against the eager reference first (bench/gate.py);
a backend that disagrees is reported as WRONG and not timed. Nothing that was not measured is written.
Outputs: ``bench/results/<device>-<date>.json`` and ``.png`` (sweep: time vs elements per backend); a
later run of the same day writes ``<device>-<date>-2.json`` and so on.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``rfsq_kernels`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.backends import BACKENDS, LABELS, PEERS, skip_reason  # noqa: E402
from bench.cases import MODES, Case, select_cases, tiny_mode  # noqa: E402
from bench.timing import copy_bandwidth_gbs, default_device, device_label, time_ms  # noqa: E402
from bench.workload import prepare  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def measure(case: Case, backend: str, mode: str, device: torch.device, copy_gbs: float, rep_ms: float) -> Dict:
    """One result row: ``status`` ok / skipped / wrong / error, with times only when ``ok``."""
    row: Dict = dict(dataclasses.asdict(case), case=case.name, numel=case.numel, positions=case.positions,
                     bits_per_token=case.bits_per_token, backend=backend, mode=mode, status="skipped")
    reason = skip_reason(backend, case, device)
    if reason:
        return dict(row, reason=reason)
    try:
        work = prepare(case, backend, mode, device)
    except Exception as exc:  # a backend that cannot even run is reported, not timed
        return dict(row, status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
    floor_ms = work.floor_bytes / (copy_gbs * 1e9) * 1e3
    row.update(floor_bytes=work.floor_bytes, floor_ms=floor_ms, gate=work.gate.detail)
    if not work.gate.ok:
        return dict(row, status="wrong", reason=f"WRONG: {work.gate.detail}")
    ms = time_ms(work.call, device, rep_ms=rep_ms)
    row.update(status="ok", median_ms=ms, gbs=work.floor_bytes / (ms * 1e-3) / 1e9, pct_floor=100 * floor_ms / ms)
    if device.type == "cuda":
        row["median_ms_events"] = time_ms(work.call, device, rep_ms=rep_ms, host=False)
    return row


def _cell(row: Optional[Dict]) -> str:
    if row is None:
        return "-"
    if row["status"] == "ok":
        return f"{row['median_ms']:.4g} ({row['pct_floor']:.2g}%)"
    return {"skipped": "skip", "wrong": "WRONG", "error": "ERROR"}[row["status"]]


def format_table(rows: List[Dict], backends: Sequence[str]) -> str:
    """Rows = case x mode; columns = backends (median ms and % of the byte floor), then the speedup
    of fused over each peer (peer time / fused time; '-' unless both were measured; the speedup
    columns are left out when fused was measured nowhere)."""
    fused_measured = any(r["backend"] == "fused" and r["status"] == "ok" for r in rows)
    peers = [b for b in backends if b in PEERS] if fused_measured else []
    header = ["case", "mode"] + [LABELS[b] for b in backends] + [f"fused/{b}" for b in peers]
    by_key: Dict = {}
    for r in rows:
        by_key.setdefault((r["case"], r["mode"]), {})[r["backend"]] = r
    lines = []
    for (case, mode), cols in by_key.items():
        fused = cols.get("fused")
        speed = []
        for b in peers:
            peer = cols.get(b)
            ok = fused and peer and fused["status"] == "ok" and peer["status"] == "ok"
            speed.append(f"{peer['median_ms'] / fused['median_ms']:.2f}x" if ok else "-")
        lines.append([case, mode] + [_cell(cols.get(b)) for b in backends] + speed)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def plot_sweep(rows: List[Dict], path: Path, title: str) -> bool:
    """Log-log time vs total elements for the sweep cases, one line per backend, one panel per mode,
    with the byte floor dashed. Returns False when there is nothing measured to plot."""
    sweep = [r for r in rows if r["group"] == "sweep" and r["status"] == "ok"]
    if not sweep:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in sweep)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for backend in BACKENDS:
            pts = sorted((r["numel"], r["median_ms"]) for r in sweep if r["mode"] == mode and r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[backend])
        floor = sorted({(r["numel"], r["floor_ms"]) for r in sweep if r["mode"] == mode})
        ax.plot(*zip(*floor), "k--", label="byte floor (copy bandwidth)")
        ax.set(xscale="log", yscale="log", xlabel="elements B*C*H*W", ylabel="median time (ms)", title=mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _versions() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not importable"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def results_stem(out_dir: Path, label: str, date: dt.date) -> str:
    """``<device>-<date>``, or ``<device>-<date>-N`` (N = 2, 3, ...) when a run of that day already wrote
    its files there: a second run never overwrites the first's results."""
    stem, n = f"{label}-{date.isoformat()}", 1
    while any((out_dir / f"{stem if n == 1 else f'{stem}-{n}'}{ext}").exists() for ext in (".json", ".png")):
        n += 1
    return stem if n == 1 else f"{stem}-{n}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    device = default_device()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", "--quick", dest="tiny", action="store_true", default=None,
                      help="small shapes (default on CPU)")
    size.add_argument("--full", dest="tiny", action="store_false", help="full shapes (default on GPU)")
    p.add_argument("--groups", nargs="+", help="case groups: training large audio video sweep")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rep-ms", type=float, default=100.0 if device.type == "cuda" else 60.0,
                   help="timing budget per measurement (ms)")
    p.add_argument("--threads", type=int, default=1 if device.type == "cpu" else None,
                   help="torch CPU threads (default 1 on CPU: shared machines, steadier numbers)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    tiny = (device.type == "cpu" or tiny_mode()) if args.tiny is None else args.tiny
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cases = select_cases(tiny=tiny, groups=args.groups)
    except ValueError as e:
        groups = sorted({c.group for c in select_cases(tiny=tiny)})
        p.error(f"--groups: {e}; choose from {' '.join(groups)}")
    label = device_label(device)
    started = time.time()
    copy_gbs = copy_bandwidth_gbs(str(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"RFSQ benchmark on {label} ({name}); {'tiny' if tiny else 'full'} shapes; "
              f"copy bandwidth {copy_gbs:.1f} GB/s (read+write)")
    if device.type == "cpu":
        header += ("\nCPU RUN: wall-clock medians on the CPU with tiny shapes; these are NOT GPU numbers "
                   "and say nothing about the fused kernels (skipped on CPU).")
    print(header, flush=True)
    rows = []
    for case in cases:
        for mode in args.modes:
            for backend in args.backends:
                rows.append(measure(case, backend, mode, device, copy_gbs, args.rep_ms))
    print("\nmedian ms (% of byte floor = floor time / measured time); fused/x = x time / fused time")
    print(format_table(rows, args.backends))
    reasons = sorted({(r["backend"], r["reason"]) for r in rows if r["status"] != "ok"})
    if reasons:
        print("\nnot timed:")
        for backend, reason in reasons:
            print(f"  {backend}: {reason}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args.out_dir, label, dt.date.today())
    record = {
        "device": label, "device_name": name, **_versions(), "date": dt.datetime.now().isoformat(timespec="seconds"),
        "tiny": tiny, "copy_gbs": copy_gbs, "threads": torch.get_num_threads(),
        "timer": ("do_bench median, host-inclusive (median_ms) and events-only (median_ms_events)"
                  if device.type == "cuda" else "CPU wall-clock median (perf_counter); not GPU numbers"),
        "floor": "bytes that must move (bench/cases.py floor_bytes) / copy bandwidth",
        "wall_s": round(time.time() - started, 1), "results": rows,
    }
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    png_path = args.out_dir / f"{stem}.png"
    plotted = plot_sweep(rows, png_path, header.split("\n")[0] + (" - CPU, not GPU numbers" if device.type == "cpu" else ""))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if plotted else " (no sweep measured: no plot)")
          + f" in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
