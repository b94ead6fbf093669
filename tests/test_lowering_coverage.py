"""Every registered op has a PyTorch lowering or is listed as unsupported by that backend."""

from specc.backends.pytorch.lowering import LOWERINGS, UNSUPPORTED
from specc.compiler import ops  # noqa: F401  (registers the operators)
from specc.compiler.registry import REGISTRY


def test_every_op_is_lowered_or_declared_unsupported():
    missing = sorted(set(REGISTRY) - set(LOWERINGS) - set(UNSUPPORTED))
    assert not missing, f"ops with no torch lowering: {missing}"


def test_no_lowering_for_unknown_ops():
    assert not set(LOWERINGS) - set(REGISTRY)
    assert not set(UNSUPPORTED) & set(LOWERINGS)


def test_ops_with_parameters_have_module_constructors():
    for name, opdef in REGISTRY.items():
        if opdef.params is not None:
            assert LOWERINGS[name].init is not None, name
