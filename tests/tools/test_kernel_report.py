"""bench/kernel_report.py's accounting of a direction of several launches (the split layernorm
forward, K + 1 launches) and bench/kernel_bytes.py's per-launch counts with the real batch's plan.
No compile: synthetic rows and loop spans, and a tiny case in the interpreter."""
import pytest

from bench.cases import Case, floor_bytes
# Imported at collection, under the interpreter that conftest selects: a test elsewhere that unsets
# TRITON_INTERPRET before the kernels are first imported would otherwise make them JIT-compiled.
from bench import kernel_bytes
from rfsq_kernels.kernels import config, launch  # noqa: F401
from bench.kernel_report import (COPY_BYTES_PER_S, direction_sums, executed_estimate, loop_trips, markdown,
                                 model_us)

LARGE = Case("large", (64, 8, 128, 128), (8, 8, 8, 8, 4, 4, 4, 4), 2, "layernorm")


def test_split_loop_trips_per_launch():
    """Tile loop: the image's tiles shared by its programs (mean over programs); decode loop:
    launch l decodes l - 1 stages."""
    # 16384 positions in 128-position tiles = 128 tiles per image, 6 programs per image
    assert loop_trips("split", LARGE, 128, 64 * 6, 0) == (pytest.approx(128 / 6), 0)
    assert loop_trips("split", LARGE, 128, 64 * 6, 1) == (pytest.approx(128 / 6), 0)
    assert loop_trips("split", LARGE, 128, 64 * 6, 4)[1] == 3
    assert loop_trips("single", LARGE, 256, 64, 0) == (64, 0)  # one program per image: every tile
    # the backward's launch l rebuilds r_{K-1-l}: K - 1 - l decodes (K = LARGE.stages)
    assert loop_trips("split", LARGE, 128, 64 * 6, 0, "backward")[1] == LARGE.stages - 1
    assert loop_trips("split", LARGE, 128, 64 * 6, LARGE.stages, "backward")[1] == 0


def test_split_executed_estimate_nests_decode_in_tile_loop():
    # instructions 0..9; the tile loop spans 2..7, the decode loop 4..5 inside it
    loops = [(2, 7), (4, 5)]
    got = executed_estimate(10, loops, "split", stages=4, chunks=3.0, decodes=2)
    assert got == 4 + 2 * 3.0 + 2 * 3.0 * 2 + 2 * 3.0  # outside, tile body before/after, decode body
    assert executed_estimate(10, loops, "split", 4, 3.0, decodes=0) == 4 + 4 * 3.0


def _row(index, launches, instr_us, executed):
    return dict(case=LARGE.name, direction="forward", kernel="fwd_layernorm_split_kernel", path="split",
                launch_index=index, launches=launches, tile="8x128", grid=384, waves=1.0, num_warps=8,
                registers=120, spill_bytes=0, shared_bytes=0, programs_per_sm=2, occupancy=0.25, sass=900,
                sass_per_elem=225, executed_per_elem=executed, executed_per_lane=executed, approx=0,
                instr_us=instr_us)


def _us(nbytes):
    return nbytes / COPY_BYTES_PER_S * 1e6


def test_split_direction_sums_and_rerender():
    """Three launches (K = 2): each row's model uses its own launch's bytes; the sum row adds
    exec/elem and µs instr and the launches' µs model, beside the direction's bytes and floor.
    This is the --from-json re-render path (markdown from saved rows and byte counts)."""
    rows = [_row(0, 3, 10.0, 60.0), _row(1, 3, 40.0, 150.0), _row(2, 3, 50.0, 190.0)]
    per_launch = [[100_000_000, 3_000], [90_000_000, 9_000_000], [60_000_000, 40_000_000]]
    nbytes = {LARGE.name: {"fwd_load": 250_000_000, "fwd_store": 49_003_000, "fwd_launches": per_launch}}
    b = nbytes[LARGE.name]
    models = [model_us(r, b, "fwd") for r in rows]
    assert models == [pytest.approx(_us(100_003_000)), 40.0, 50.0]  # bytes-bound, then instruction-bound
    (total,) = direction_sums(rows, nbytes)
    assert total["launches"] == 3 and total["executed_per_elem"] == 400.0 and total["instr_us"] == 100.0
    assert total["model_us"] == pytest.approx(sum(models))
    assert (total["load"], total["store"]) == (250_000_000, 49_003_000)

    md = markdown(rows, [LARGE], nbytes, 90)
    sum_line = next(line for line in md.splitlines() if "sum of 3 launches" in line)
    cells = [c.strip() for c in sum_line.strip("|").split("|")]
    assert cells[15] == "400" and cells[18:20] == ["250.0", "49.0"]
    assert cells[20] == f"{floor_bytes(LARGE, 'fwd') / 1e6:.1f}" and cells[-1] == f"{sum(models):.1f}"
    launch_1 = next(line for line in md.splitlines() if "(launch 1)" in line)
    cells = [c.strip() for c in launch_1.strip("|").split("|")]
    assert cells[18:22] == ["90.0", "9.0", "", ""]  # its own bytes; the floor is the direction's


def test_one_launch_rows_keep_direction_bytes():
    """A row of a one-launch direction (and a row saved before launches were recorded) uses the
    direction's bytes and gets no sum row."""
    row = _row(0, 1, 10.0, 60.0)
    del row["launch_index"], row["launches"]
    b = {"fwd_load": 3_000_000_000, "fwd_store": 0}
    assert model_us(row, b, "fwd") == pytest.approx(1000.0)
    assert direction_sums([row], {LARGE.name: b}) == []
    # bytes counted per launch for another launch count: not matched to this row
    split_row = _row(0, 3, 10.0, 60.0)
    assert model_us(split_row, {"fwd_launches": [[1, 1]], "fwd_load": 2e9, "fwd_store": 0}, "fwd") == 10.0


def test_kernel_bytes_counts_each_split_launch_with_the_real_batch_plan(monkeypatch):
    """The split forward and backward in the interpreter: K + 1 launches each, counted one by one (their sum is the
    direction's), the plan being that of the case's batch, so the count is linear in the images run."""
    monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)  # 8-position split tiles: 6 per 5x9 image
    case = Case("training", (132, 4, 5, 9), (8, 5, 3, 4), 3, "layernorm")
    tiles = config.layernorm_tiles(4, 45)
    split_tiles = config.Tiles(tiles.block_c, tiles.block_s // 2, tiles.num_warps, False)
    with kernel_bytes.split_plan_of_batch(132):
        assert config.layernorm_split_plan(1, 45, split_tiles).parts == 2  # 132 images: 2 programs each
    assert config.layernorm_split_plan(1, 45, split_tiles).parts == 6      # restored; alone: every tile
    one, two = kernel_bytes.case_bytes(case, images=1), kernel_bytes.case_bytes(case, images=2)
    assert len(one["fwd_launches"]) == case.stages + 1 and len(one["bwd_launches"]) == case.stages + 1
    for d in ("fwd", "bwd"):
        assert [sum(c) for c in zip(*one[f"{d}_launches"])] == [one[f"{d}_load"], one[f"{d}_store"]]
    assert one == two


def test_kernel_bytes_uses_the_target_tile_policy():
    """sm_100 keeps half as many elements in one layernorm tile: bytes are counted with its tiles."""
    import torch

    z = torch.zeros(1)
    with kernel_bytes.tiles_of_arch(100):
        assert config.target_arch(z) == 100
        assert not config.layernorm_tiles(5, 1024, arch=config.target_arch(z)).one_tile
    assert config.target_arch(z) is None and config.layernorm_tiles(5, 1024, arch=None).one_tile


def test_vq_report_has_the_standalone_fsq_once_per_shape_levels_and_dtype():
    """``--family vq_rfsq`` also reports vector-quantize-pytorch's FSQ: one K=1 case per shape,
    levels and dtype of the ResidualFSQ cases, with a byte floor like any case."""
    from bench.cases import VQ_FSQ_STRATEGY, floor_bytes, vq_cases, vq_fsq_cases

    fsq = vq_fsq_cases()
    keys = {(c.group, c.shape, c.levels, c.dtype) for c in vq_cases(tiny=False)}
    assert {(c.group, c.shape, c.levels, c.dtype) for c in fsq} == keys and len(fsq) == len(keys)
    assert all(c.strategy == VQ_FSQ_STRATEGY and c.stages == 1 for c in fsq)
    assert all(floor_bytes(c, "fwd") < floor_bytes(c, "fwdbwd") for c in fsq)
    assert vq_fsq_cases(["training"]) and all(c.group == "training" for c in vq_fsq_cases(["training"]))
