"""Input dimensions that are expressions, on the TVM backend: a * S + b in one symbol (an image side 4 * Hq
that pools twice; 2 * T + 1), and expressions of symbols that are whole dimensions of other inputs
(B * T), and a * S + b whose a and b hold symbols other inputs give (2 * T + H, T * K + 1: H and K
solved once T is known, in the order that needs). One library serves every size: the function takes a size variable for such an axis, S is
solved from it, and the runner checks that the sizes fit before the call (a clear ValueError, not a VM
error). Outputs against the float64 torch oracle on the same perturbed weights (tolerance as
tests/test_tvm_equivalence.py: 1e-4 * max(1, |oracle|)); tuned static copies at such sizes too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import specc  # noqa: E402
from specc.backends.pytorch.weights import init_weights  # noqa: E402
from specc.backends.tvm.build import compile_graph  # noqa: E402
from specc.backends.tvm.tuning import tune  # noqa: E402

from test_tvm_equivalence import assert_close, oracle_of, run_oracle, torch_model  # noqa: E402

UNET = """\
specc: 1
name: unet
dims:
  Hq: {example: 3, max: 8}
  Wq: 2
inputs:
  x: f32[B, 3, 4 * Hq, 4 * Wq]
graph: |
  e1 = relu(conv2d(x, 4, 3, padding=1))
  e2 = relu(conv2d(max_pool2d(e1, 2), 8, 3, padding=1))
  mid = relu(conv2d(max_pool2d(e2, 2), 8, 3, padding=1))
  d2 = relu(conv2d(concat([upsample(mid, 2), e2], dim=1), 4, 3, padding=1))
  d1 = conv2d(concat([upsample(d2, 2), e1], dim=1), 2, 1)
outputs:
  d1: f32[B, 2, 4 * Hq, 4 * Wq]
"""

#: 2 * T + 1 (a constant term), and B * T where both are whole dimensions of x
MIXED = """\
specc: 1
name: mixed
dims:
  T: {example: 3, max: 9}
inputs:
  x: f32[B, T, 4]
  odd: f32[B, 2 * T + 1]
  flat: f32[B * T, 4]
graph: |
  pairs = reshape(odd[:, 1:], B, T, 2)
  y = concat([x + reshape(flat, B, T, 4), pairs * odd[:, 0:1][:, :, None]], dim=2)
outputs:
  y: f32[B, T, 6]
"""


#: H solved from 2 * T + H once T is read; K from K * T + 1 (a symbol's factor); G from G + H, after H
SOLVED = """\
specc: 1
name: solved
dims:
  H: {example: 4, max: 12}
  K: 5
  G: 2
inputs:
  later: f32[B, G + H]
  x: f32[B, T]
  z: f32[B, 2 * T + H]
  w: f32[B, T * K + 1]
graph: |
  y = z[:, :H] * 2.0 + later[:, G:]
  v = reshape(w[:, 1:], B, T, K) * x[:, :, None]
outputs:
  y: f32[B, H]
  v: f32[B, T, K]
"""


#: one pooling step over 2 * Hq: the tuning test's spec (tuning the U-Net's five convolutions would take long;
#: the U-Net is compiled once, for the two tests that run it)
POOL = """\
specc: 1
name: pool
dims:
  Hq: {example: 3, max: 8}
inputs:
  x: f32[B, 4, 2 * Hq, 6]
graph: |
  y = linear(max_pool2d(x, 2), 5)
outputs:
  y: f32[B, 4, Hq, 5]
"""


def _check(text: str, sizes: list[dict[str, int]], perturb, tuning_db=None, runner=None):
    graph = specc.compile(text)
    weights = perturb(init_weights(graph))
    runner = runner or compile_graph(graph, tuning_db=tuning_db)
    runner.bind(weights)
    model = torch_model(text, {}, weights)
    oracle = oracle_of(model)
    for seed, dims in enumerate(sizes):
        inputs = model.example_inputs(seed=seed, **dims)
        assert_close(runner(*inputs), run_oracle(oracle, inputs), f"{graph.name} at {dims}")
    return runner, model


@pytest.fixture(scope="module")
def unet():
    return compile_graph(specc.compile(UNET))


def test_a_unet_over_symbolic_image_sizes_from_one_library(perturb, unet):
    runner, _ = _check(UNET, [{"B": 2, "Hq": 3}, {"B": 1, "Hq": 5, "Wq": 2}], perturb, runner=unet)
    assert runner.manifest["inputs"][0]["shape"] == ["B", 3, [[4, ["Hq"]]], [[4, ["Wq"]]]]


def test_a_constant_term_and_a_product_of_whole_dimensions(perturb):
    _check(MIXED, [{"B": 2, "T": 3}, {"B": 3, "T": 7}], perturb)


def test_symbols_solved_with_the_sizes_of_others(perturb):
    runner, model = _check(SOLVED, [{"B": 2, "T": 3}, {"B": 1, "T": 1, "H": 1, "K": 1, "G": 1},
                                    {"B": 3, "T": 6, "H": 12, "K": 2, "G": 4}], perturb)
    assert runner.manifest["inputs"][2]["shape"] == ["B", [[1, ["H"]], [2, ["T"]]]]
    x, later, z, w = torch.randn(2, 3), torch.randn(2, 6), torch.randn(2, 10), torch.randn(2, 16)
    for bad, message in (({"z": torch.randn(2, 6)}, "input z: dimension 1 is 6, but must be H + 2*T for a whole "
                                                    "H >= 1 with T=3"),
                         ({"w": torch.randn(2, 15)}, "input w: dimension 1 is 15, but must be K*T + 1 for a whole "
                                                     "K >= 1 with T=3"),
                         ({"later": torch.randn(2, 4)}, "input later: dimension 1 is 4, but must be G + H for a "
                                                        "whole G >= 1 with H=4")):
        given = {"later": later, "x": x, "z": z, "w": w, **bad}
        assert _same_error(runner, model, *given.values()) == message


def _same_error(runner, model, *inputs) -> str:
    """The runner's ValueError for these inputs, which the torch model gives too, word for word."""
    with pytest.raises(ValueError) as tvm_error:
        runner(*inputs)
    with pytest.raises(ValueError) as torch_error:
        model(*inputs)
    assert str(torch_error.value) == str(tvm_error.value)
    return str(tvm_error.value)


def test_sizes_that_do_not_fit_are_clear_errors(perturb, unet):
    runner, model = _check(UNET, [{"B": 1, "Hq": 2}], perturb, runner=unet)
    for inputs, message in ((torch.randn(1, 3, 10, 8), "input x: dimension 2 is 10, but must be 4*Hq for a whole Hq >= 1"),
                            (torch.randn(1, 3, 0, 8), "input x: dimension 2 is 0, but must be 4*Hq for a whole Hq >= 1"),
                            (torch.randn(1, 3, 36, 8), "input x: dimension 2 (4*Hq) gives Hq=9, outside [1, 8]"),
                            (torch.randn(1, 4, 8, 8), "input x: dimension 1 is 4, expected 3")):
        assert _same_error(runner, model, inputs) == message
    graph = specc.compile(MIXED)
    mixed = compile_graph(graph, weights=init_weights(graph))
    mixed_torch = specc.load(MIXED)
    x, odd, flat = torch.randn(2, 3, 4), torch.randn(2, 7), torch.randn(6, 4)
    assert _same_error(mixed, mixed_torch, x, odd, flat[:5]) == \
        "input flat: dimension 0 is 5, but must be B*T = 6 with B=2, T=3"
    assert _same_error(mixed, mixed_torch, x, torch.randn(2, 9), flat).startswith(
        "input odd: dimension 1 is 9, but must be 2*T + 1 = 7")
    # one size per symbol: B is 2 in x, so odd's 3 rows do not fit (the runner had taken the first size
    # and left the mismatch to the VM)
    assert _same_error(mixed, mixed_torch, x, torch.randn(3, 7), flat) == \
        "input odd: dimension 0 is 3, but input x: dimension 0 (B) gives B=2"


def test_tuned_static_copies_at_such_sizes(perturb, tmp_path):
    graph = specc.compile(POOL)
    tune(graph, tmp_path, dims={"B": 1, "Hq": 3}, trials=1, strategy="replay-trace", measure_repeats=1,
         check_model=False)
    runner, model = _check(POOL, [{"B": 1, "Hq": 3}, {"B": 1, "Hq": 4}], perturb, tuning_db=tmp_path)
    runner(*model.example_inputs(B=1, Hq=3))
    assert runner.last_function == "main__B1_Hq3"
    runner(*model.example_inputs(B=1, Hq=4))
    assert runner.last_function == "main"


def test_integer_inputs_out_of_range_are_refused_whatever_the_other_inputs():
    """The value-range check of every integer input (ids index tables: out of range, a gather reads what
    it finds), beside another input and with no symbolic sizes at all."""
    for batch in ("B", "2"):
        text = f"""\
specc: 1
name: ids
inputs:
  idx: i64[{batch}, 4] in range(10)
  x: f32[{batch}, 4, 8]
graph: |
  y = embedding(idx, 10, 8) + x
outputs:
  y:
"""
        graph = specc.compile(text)
        runner = compile_graph(graph, weights=init_weights(graph))
        with pytest.raises(IndexError, match=r"input idx: values must lie in range\(0, 10\), got values from 0 to 50"):
            runner(torch.tensor([[0, 1, 2, 50]] * 2), torch.zeros(2, 4, 8))
        runner(torch.tensor([[0, 1, 2, 9]] * 2), torch.zeros(2, 4, 8))
