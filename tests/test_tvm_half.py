"""float16 and bfloat16 models on tvm-llvm: the nan-keeping forms (relu, amax/amin, maximum, clamp, erf,
max pools, argmax), the activations, and sums that add up in float32 as torch's do.

Reference: each output of the same spec computed by the PyTorch backend in float64 from the half-precision
inputs (the half values exactly), rounded once to the half dtype. TVM's half results: nan where the
reference has nan, else within 4 units in the last place of the half dtype times max(1, |reference|)
(2^-8 for bf16, 2^-11 for f16: a few roundings of elementwise steps). A sum over 2048 values of 0.1 is
within 1% of the float64 sum, where adding up in half precision is 15% off (bf16 stops at 32 or less).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import specc  # noqa: E402
from specc.backends.tvm.build import compile_graph  # noqa: E402

TORCH = {"bf16": torch.bfloat16, "f16": torch.float16}
ULP = {"bf16": 2.0 ** -8, "f16": 2.0 ** -11}
OPS = {
    "relu": "relu(x)", "amax": "amax(x, dim=-1)", "amin": "amin(x, dim=[0, 2])", "maximum": "maximum(x, x * 2.0)",
    "clamp": "clamp(x, min=-0.5, max=0.5)", "erf": "erf(x)", "pool": "max_pool1d(x, 2)", "argmax": "argmax(x)",
    "sign": "sign(x)", "elu": "elu(x)", "softplus": "softplus(x)", "mish": "mish(x)", "hswish": "hardswish(x)",
    "sum": "sum(x, dim=-1)", "mean": "mean(x)", "cumsum": "cumsum(x, dim=1)", "mlp": "mlp(x, hidden=4, act=relu)",
}


def spec(dtype: str, shape: str, ops: dict[str, str]) -> str:
    body = "".join(f"  o_{k} = {v}\n" for k, v in ops.items())
    outs = "".join(f"  o_{k}:\n" for k in ops)
    return f"specc: 1\nname: half\ninputs:\n  x: {dtype}[{shape}]\ngraph: |\n{body}outputs:\n{outs}"


def run(text: str, x: torch.Tensor):
    graph = specc.compile(text)
    model = specc.load(text, opt_level=0)
    runner = compile_graph(graph, weights={k: v.detach() for k, v in model.state_dict().items()})
    with torch.no_grad():
        want = model.double()(x.double())
    return runner(x), want


@pytest.mark.parametrize("dtype", sorted(TORCH))
def test_half_precision_ops_on_tvm_llvm(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (2.0 * torch.randn(2, 3, 6, generator=gen)).to(TORCH[dtype])
    x[0, 0, 1] = float("nan")
    got, want = run(spec(dtype, "B, 3, 6", OPS), x)
    for name, g, w in zip(OPS, got, want):
        if name == "argmax":
            assert g.dtype == torch.int64 and torch.equal(g, w), name
            continue
        w = w.to(TORCH[dtype]).double()  # the reference rounded once
        assert g.dtype == TORCH[dtype] and g.shape == w.shape, name
        assert torch.equal(g.isnan(), w.isnan()), name
        ok = ~w.isnan()
        if ok.any():  # (the mean of all of x is nan alone)
            err = (g.double()[ok] - w[ok]).abs().max().item()
            assert err <= 4 * ULP[dtype] * max(1.0, w[ok].abs().max().item()), f"{dtype} {name}: {err:.3g}"
    assert want[list(OPS).index("amax")].isnan().any()  # the nan took part


@pytest.mark.parametrize("dtype", sorted(TORCH))
def test_half_sums_add_up_in_float32(dtype):
    x = torch.full((1, 2048), 0.1).to(TORCH[dtype])
    got, want = run(spec(dtype, "B, 2048", {"s": "sum(x, dim=-1)", "c": "cumsum(x)", "m": "mean(x)"}), x)
    for name, g, w in zip("scm", got, want):
        rel = ((g.double() - w).abs() / w.abs().clamp_min(1e-3)).max().item()
        assert rel <= 0.01, f"{dtype} {name}: relative error {rel:.3g}"
