"""Differential testing over random valid specs (after NNSmith): every generated spec computes the
same at -O0 and -O2 (float64 oracle; tolerances in tests/equivalence.py). A failure shrinks to a
minimal spec, printed as spec text."""

import torch
from hypothesis import HealthCheck, given, note, settings

from equivalence import assert_equivalent
from specc.compiler.passes import PassContext
from specgen import image_specs, specs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=specs())
def test_O0_equals_O2_on_random_specs(text):
    note(text)
    assert_equivalent(text, PassContext(opt_level=2, verify_each=True))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=specs(min_ops=4, max_ops=12))
def test_O2_builds_are_deterministic(text):
    note(text)
    _, a = assert_equivalent(text, PassContext(opt_level=2))
    _, b = assert_equivalent(text, PassContext(opt_level=2))
    assert a == b


def test_generated_specs_reach_the_passes():
    """The generator is worth little if the passes never fire on what it makes."""
    from hypothesis import find

    import specc
    from specc.compiler.passes import optimize

    fired = set()
    names = ("fold_constants", "eliminate_identity", "cse", "merge_adapters", "merge_linear_chains", "fuse_qkv",
             "attention_sdpa")
    for name in names:
        def fires(text, name=name):
            _, records = optimize(specc.compile(text), PassContext(opt_level=2))
            return any(r.name == name and r.modified for r in records)

        find(specs(min_ops=3, max_ops=8), fires, settings=settings(max_examples=300, database=None, deadline=None))
        fired.add(name)
    assert fired == set(names)
    assert torch.get_default_dtype() == torch.float32


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=image_specs())
def test_O0_equals_O2_on_random_convolutional_specs(text):
    note(text)
    assert_equivalent(text, PassContext(opt_level=2, verify_each=True))
