"""bench/compare_binaries.py: the check that a refactor left every compiled binary as it was."""
import json

from bench.compare_binaries import main


def _record(**over):
    rec = dict(arch=90, kernel="_fwd_k", num_warps=4, x_dtype="fp32", index_dtype="i32", case="forward K=1",
               constexprs={"BLOCK_C": 8, "STAGE": "JITFunction(rfsq_kernels.kernels.elementwise:none_stage)"},
               registers=40, spill_bytes=0, sass_instructions=300, sass_sha256="ab", approx={"outside": 0},
               fp_fusion=False, hash="h1")
    rec.update(over)
    return rec


def _write(tmp_path, name, recs):
    path = tmp_path / name
    path.write_text(json.dumps({"binaries": recs}))
    return str(path)


def test_a_moved_helper_and_a_new_hash_are_the_same_binary(tmp_path, capsys):
    before = _write(tmp_path, "b.json", [_record()])
    moved = _record(hash="h2", constexprs={"BLOCK_C": 8, "STAGE": "JITFunction(rfsq_kernels.kernels.x.y:none_stage)"})
    assert main([before, _write(tmp_path, "a.json", [moved])]) == 0
    assert "identical" in capsys.readouterr().out


def test_any_changed_column_or_missing_binary_fails(tmp_path, capsys):
    before = _write(tmp_path, "b.json", [_record(), _record(case="forward K=2")])
    assert main([before, _write(tmp_path, "a.json", [_record(sass_sha256="cd")])]) == 1
    out = capsys.readouterr().out
    assert "sass_sha256 ab -> cd" in out and "only before" in out
    assert main([before, _write(tmp_path, "c.json", [_record()]), "--common"]) == 0


def test_a_new_constexpr_at_its_default_pairs_and_is_compared(tmp_path, capsys):
    before = _write(tmp_path, "b.json", [_record(), _record(case="grouped K=1")])
    plain = {"BLOCK_C": 8, "STAGE": "none_stage", "GROUPED": False}
    grouped = dict(plain, GROUPED=True)
    after = _write(tmp_path, "a.json", [_record(constexprs=plain, registers=41),
                                        _record(case="grouped K=1", constexprs=grouped)])
    assert main([before, after, "--pair-defaults"]) == 1
    out = capsys.readouterr().out
    assert "1 in both" in out and "registers 40 -> 41" in out and "('GROUPED', False)" in out
    # the GROUPED=True binary has no partner: one missing on each side
    assert out.count("only before") == 1 and out.count("only after") == 1 and "('GROUPED', True)" in out
    # without the flag nothing pairs; with --common the unpaired ones are counted, not failed
    assert main([before, after, "--common"]) == 0 and "0 in both" in capsys.readouterr().out
    assert main([before, after, "--common", "--pair-defaults"]) == 1


def test_a_new_constexpr_at_zero_or_two_candidates_does_not_pair(tmp_path, capsys):
    before = _write(tmp_path, "b.json", [_record()])
    at_zero = _write(tmp_path, "z.json", [_record(constexprs={"BLOCK_C": 8, "STAGE": "none_stage", "PHASE": 0})])
    assert main([before, at_zero, "--common", "--pair-defaults"]) == 0 and "0 in both" in capsys.readouterr().out
    two = _write(tmp_path, "t.json", [_record(constexprs={"BLOCK_C": 8, "STAGE": "none_stage", "A": False}),
                                      _record(constexprs={"BLOCK_C": 8, "STAGE": "none_stage", "B": None})])
    assert main([before, two, "--common", "--pair-defaults"]) == 0 and "0 in both" in capsys.readouterr().out
