"""Every registered op has a TVM (Relax) lowering or is listed as unsupported by that backend."""

import pytest

pytest.importorskip("tvm")

from specc.backends.tvm.lowering import LOWERINGS, UNSUPPORTED  # noqa: E402
from specc.compiler import ops  # noqa: E402,F401  (registers the operators)
from specc.compiler.registry import REGISTRY  # noqa: E402


def test_every_op_is_lowered_or_declared_unsupported():
    missing = sorted(set(REGISTRY) - set(LOWERINGS) - set(UNSUPPORTED))
    assert not missing, f"ops with no tvm lowering: {missing}"


def test_no_lowering_for_unknown_ops():
    assert not set(LOWERINGS) - set(REGISTRY), sorted(set(LOWERINGS) - set(REGISTRY))
    assert not set(UNSUPPORTED) - set(REGISTRY), sorted(set(UNSUPPORTED) - set(REGISTRY))
    assert not set(UNSUPPORTED) & set(LOWERINGS)
