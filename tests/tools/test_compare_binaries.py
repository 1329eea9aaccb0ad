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
