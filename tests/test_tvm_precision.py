"""Relative precision of TVM's softplus, mish and float64 tanh where their values are small: torch
computes softplus as log1p(exp(x)) (Relax's log(1 + exp(x)) is 0 below x = -17 in float32), and TVM's
float64 tanh lost relative precision near 0 (2e-5 at x = 1e-12).

Reference: torch in float64. Bounds: relative error <= 1e-13 in float64 and <= 1e-6 in float32, over
values that are normal numbers in the dtype (float32 denormals, below 1.2e-38, are left out)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

import specc  # noqa: E402
from specc.backends.tvm.build import compile_graph  # noqa: E402

OPS = {"softplus": (lambda x: F.softplus(x)), "mish": F.mish, "tanh": torch.tanh,
       "softplus2": (lambda x: F.softplus(x, beta=2.0, threshold=5.0))}
EXPRS = {"softplus": "softplus(x)", "mish": "mish(x)", "tanh": "tanh(x)",
         "softplus2": "softplus(x, beta=2.0, threshold=5.0)"}


@pytest.mark.parametrize("dtype, bound", [("f64", 1e-13), ("f32", 1e-6)])
def test_small_values_keep_their_relative_precision(dtype, bound):
    body = "".join(f"  o_{k} = {v}\n" for k, v in EXPRS.items())
    text = (f"specc: 1\nname: prec\ninputs:\n  x: {dtype}[N]\ngraph: |\n{body}outputs:\n"
            + "".join(f"  o_{k}:\n" for k in EXPRS))
    runner = compile_graph(specc.compile(text))
    runner.bind({})
    tdt = {"f64": torch.float64, "f32": torch.float32}[dtype]
    mags = torch.logspace(-12, 1.6, 200, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.tensor([-80.0, -35.0, -20.0, 0.0, 21.0])]).to(tdt)
    tiny = torch.finfo(tdt).tiny
    for name, got in zip(EXPRS, runner(x)):
        want = OPS[name](x.double())
        normal = want.abs() >= tiny
        rel = ((got.double() - want).abs() / want.abs())[normal]
        assert got.dtype == tdt and rel.max().item() <= bound, f"{dtype} {name}: {rel.max().item():.3g}"
        assert torch.equal(got[~normal].double(), want[~normal].to(tdt).double()) or dtype == "f32", name
