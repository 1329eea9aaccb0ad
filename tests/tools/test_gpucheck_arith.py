"""gpucheck's arithmetic-contract rule (issue 17) on hand-written PTX: approximate division and
square root are found anywhere, ``ex2``/``rcp.approx`` only inside libdevice ``tanh`` blocks
(the block that falls or jumps into a ``__nv_tanhf`` label) pass, and FMA contraction fails."""
from rfsq_kernels.gpucheck.binary import approx_math
from rfsq_kernels.gpucheck.check import arithmetic_problems

TANH = """
	setp.ltu.f32 	%p5, %r20, 0f3F19999A;
	@!%p5 bra 	$L__BB0_3;
// %bb.4:                               // %__internal_fmad.exit3.i
	fma.rn.ftz.f32 	%r347, %r98, %r12, %r12;
	bra.uni 	$L__BB0_5;
$L__BB0_3:                              // %__internal_fmad.exit1.i
	ex2.approx.ftz.f32 	%r83, %r82;
	// begin inline asm
	rcp.approx.ftz.f32 %r80,%r81;
	// end inline asm
$L__tmp39:
$L__BB0_5:                              // %__nv_tanhf.exit
	add.f32 	%r13, %r345, %r36;
"""
# The same call laid out with its large-|x| block after the join point (it jumps back).
TANH_JUMPING = """
$L__BB0_26:                             // %__nv_tanhf.exit161
	add.f32 	%r13, %r345, %r36;
	bra.uni 	$L__BB0_27;
// %bb.24:                              // %__internal_fmad.exit1.i146
	ex2.approx.ftz.f32 	%r216, %r215;
	rcp.approx.ftz.f32 %r213,%r214;
	bra.uni 	$L__BB0_26;
$L__tmp53:
$L__BB0_27:                             // %._crit_edge
	st.global.b32 	[%rd1], %r13;
"""


def _binary(ptx, fusion=False):
    return dict(kernel="k", arch=90, constexprs={}, case="c", approx=approx_math(ptx), fp_fusion=fusion)


def test_tanh_blocks_pass_and_count_one_ex2_and_rcp_per_call():
    for ptx in (TANH, TANH_JUMPING):
        counts = approx_math(ptx)
        assert counts == {"outside": 0, "in_tanh": 2, "tanh_calls": 1}
        assert arithmetic_problems([_binary(ptx)]) == []


def test_approximate_division_sqrt_and_stray_rcp_are_named_per_binary():
    ptx = TANH + "\tdiv.full.f32 \t%r258, %r250, %r38;\n\tsqrt.approx.ftz.f32 \t%r1, %r2;\n" \
        "\t@%p1 rcp.approx.ftz.f32 \t%r3, %r4;\n\tdiv.rn.f32 \t%r5, %r6, %r7;\n"
    counts = approx_math(ptx)
    assert counts["outside"] == 3 and counts["in_tanh"] == 2
    assert counts["div.full.f32"] == counts["sqrt.approx.ftz.f32"] == counts["rcp.approx.ftz.f32"] == 1
    (problem,) = arithmetic_problems([_binary(ptx)])
    assert "3 approximate-math" in problem and "1 div.full.f32" in problem and "k sm_90" in problem


def test_fp_fusion_on_fails():
    (problem,) = arithmetic_problems([_binary(TANH, fusion=True)])
    assert "enable_fp_fusion=True" in problem
