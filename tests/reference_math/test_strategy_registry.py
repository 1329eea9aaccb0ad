"""One registration per strategy: ``register_strategy`` fills every table from one definition, or
refuses it whole with a ValueError naming the strategy and the missing piece; the kernel families
are declared interfaces whose launchers take no argument they ignore."""
import dataclasses

import pytest
import torch

from rfsq_kernels import testing
from rfsq_kernels.kernels import elementwise, launch
from rfsq_kernels.reference import (PARAM_ROLES, STRATEGIES, STRATEGY_TABLE, ParamRole, ParamSpec, Strategy,
                                    StrategyDefinition, register_strategy, registered_strategy, rfsq_forward)
from rfsq_kernels.reference import strategies
from rfsq_kernels.reference.strategies import none, scale

PROBE = "probe"


def _definition(**changes) -> StrategyDefinition:
    """A complete elementwise definition (the ``none`` math under another name), then ``changes``."""
    base = StrategyDefinition(row=Strategy(PROBE, (), per_image_stats=False, summary="probe"),
                              stage_math=none.stage_math, decode_math=none.decode_math,
                              kernel_stage="rfsq_kernels.kernels.elementwise:NONE_STAGE")
    return dataclasses.replace(base, **changes)


def _tables():
    return {name: dict(getattr(strategies, name)) for name in
            ("STRATEGY_TABLE", "PARAM_ROLES", "DISTRIBUTIONS", "STAGE_MATH", "DECODE_MATH", "KERNEL_STAGES")}


def _draw(base, gen):
    return base + torch.randn(base.shape, generator=gen)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_builtin_strategy_has_every_piece(strategy):
    row = STRATEGY_TABLE[strategy]
    assert callable(strategies.STAGE_MATH[strategy]) and callable(strategies.DECODE_MATH[strategy])
    for spec in row.params:
        assert spec.role in PARAM_ROLES and testing.DISTRIBUTIONS[spec.role] is PARAM_ROLES[spec.role].draw
    if row.kernel_family in strategies.STAGED_FAMILIES:
        assert isinstance(launch.kernel_stage(strategy), elementwise.ElementwiseStage)
    else:
        assert strategy not in strategies.KERNEL_STAGES


def test_testing_distributions_is_the_registry_table():
    assert testing.DISTRIBUTIONS is strategies.DISTRIBUTIONS


def test_registration_fills_every_table_and_unregistration_empties_them(seed):
    before = _tables()
    role = ParamRole(lambda _s: 0.5, draw=_draw)
    d = _definition(row=Strategy(PROBE, (ParamSpec("p", False, "probe_role"),), False, "probe"),
                    roles={"probe_role": role}, stage_math=scale.stage_math, decode_math=scale.decode_math)
    with registered_strategy(d) as name:
        assert name == PROBE and STRATEGY_TABLE[PROBE] is d.row and PARAM_ROLES["probe_role"] is role
        assert testing.DISTRIBUTIONS["probe_role"] is _draw
        assert strategies.STAGE_MATH[PROBE] is scale.stage_math and strategies.DECODE_MATH[PROBE] is scale.decode_math
        params = testing.random_strategy_params(PROBE, 2, 3)
        q, *_ = rfsq_forward(torch.randn(2, 3, 4), [5, 5, 5], 2, PROBE, **params)
        assert q.shape == (2, 3, 4)
    assert _tables() == before


@pytest.mark.parametrize("changes, missing", [
    (dict(decode_math=None), "no decode math"),
    (dict(stage_math=None), "no stage math"),
    (dict(kernel_stage=None), "no kernel stage"),
    (dict(row=Strategy(PROBE, (ParamSpec("p", False, "nowhere"),), False, "probe")),
     "parameter 'p' has the role 'nowhere'"),
    (dict(row=Strategy(PROBE, (ParamSpec("p", False, "r"),), False, "probe"),
          roles={"r": ParamRole(lambda _s: 0.0)}), "role 'r' has no test distribution"),
    (dict(roles={"gain": ParamRole(lambda _s: 1.0, draw=_draw)}), "role 'gain' is already registered"),
    (dict(row=Strategy("scale", (), False, "probe")), "already registered"),
    (dict(row=Strategy(PROBE, (), True, "probe", kernel_family="layernorm")),
     "a kernel stage, which the 'layernorm' family does not take"),
    (dict(row=Strategy(PROBE, (), True, "probe", kernel_family="layernorm"), kernel_stage=None),
     "already runs 'layernorm'"),
])
def test_a_missing_or_inconsistent_piece_is_refused_whole(changes, missing):
    before = _tables()
    with pytest.raises(ValueError, match=r"strategy '\w+' cannot be registered: .*" + missing):
        register_strategy(_definition(**changes))
    assert _tables() == before, "a refused registration changes nothing"


def test_an_unknown_kernel_family_names_the_strategy():
    with pytest.raises(ValueError, match=r"strategy 'probe': kernel_family must be one of .* got 'tiles'"):
        Strategy(PROBE, (), False, "probe", kernel_family="tiles")


@pytest.mark.parametrize("stage, problem", [
    ("rfsq_kernels.kernels.elementwise:NO_SUCH_STAGE", "cannot be imported"),
    ("no_such_module:STAGE", "cannot be imported"),
    ("rfsq_kernels.kernels.elementwise:none_stage", "its family takes ElementwiseStage"),
])
def test_a_kernel_stage_that_cannot_be_had_fails_on_first_use(stage, problem):
    with registered_strategy(_definition(kernel_stage=stage)):
        with pytest.raises(ValueError, match=f"strategy 'probe': its kernel stage .*{problem}"):
            launch.kernel_stage(PROBE)


def test_a_family_launcher_with_an_ignored_argument_is_refused():
    def forward(z, levels, stages, params, mask, active_stages, fsq_shift, stage, eps):
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="the family interface"):
        launch.KernelFamily(elementwise.forward_outputs, forward, elementwise.backward,
                            forward_inputs=("stage",), backward_inputs=("stage",),
                            stage_type=elementwise.ElementwiseStage)
