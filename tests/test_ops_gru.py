"""gru(x, hidden, layers=1, bidirectional=false) against torch.nn.GRU(batch_first=True).

The op's parameters are torch.nn.GRU's (weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, ..._reverse;
gates r, z, n), so a torch GRU's state_dict loads into the built module by name (under the layer's
name, `y.`). Checks: the gate equations written out equal torch.nn.GRU (the n gate's
r * (W_hn h + b_hn)); the PyTorch backend at -O0/-O1/-O2 in float64 with a torch GRU's weights,
max |difference| <= 1e-12, for 1 and 2 layers, uni- and bidirectional; tvm-llvm from one library at two
sizes each, in float32 (max |tvm - float64 torch| <= 1e-4 * max(1, max |torch|), test_tvm_ops's
tolerance: polynomial sigmoid/tanh in float32) and in float64 (1e-12); CUDA C for sm_90 without a GPU
(nvcc when installed); parameters, dtypes, initialisation, FLOPs, call options and located errors.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import specc
from specc.backends.pytorch.build import artifacts
from specc.backends.pytorch.weights import init_weights

from opcheck import assert_error, flops_of, spec_text

TOL = 1e-12
TOL_F32 = 1e-4
D, H = 6, 5


def gru_spec(layers: int, bidirectional: bool, dtype: str = "f64", hidden: int = H, options: str = "") -> str:
    return spec_text(f"x: '{dtype}[B, T, {D}]'", f"y = gru(x, {hidden}, layers={layers}, "
                     f"bidirectional={str(bidirectional).lower()}{options})")


def torch_gru(layers: int, bidirectional: bool, hidden: int = H, seed: int = 0) -> nn.GRU:
    torch.manual_seed(seed)
    return nn.GRU(D, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional, dtype=torch.float64)


def prefixed(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A torch GRU's state_dict under the spec's layer name."""
    return {f"y.{k}": v.to(dtype) for k, v in state.items()}


def gru_direction(x, w_ih, w_hh, b_ih, b_hh, reverse: bool) -> torch.Tensor:
    """One direction of one layer, the gates written out (torch.nn.GRU's equations, h0 = 0)."""
    h = x.new_zeros(x.shape[0], w_hh.shape[1])
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    out = [None] * x.shape[1]
    for t in steps:
        xr, xz, xn = (x[:, t] @ w_ih.T + b_ih).chunk(3, dim=-1)
        hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        out[t] = h
    return torch.stack(out, dim=1)


CONFIGS = [(1, False), (1, True), (2, False), (2, True)]


@pytest.mark.parametrize("layers, bidirectional", CONFIGS)
def test_written_out_gates_are_torch_gru(layers, bidirectional):
    """The reference: gate order r, z, n, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), the backward
    direction's output after the forward one's, layer k > 0 reading layer k-1's output."""
    ref = torch_gru(layers, bidirectional)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    p, y = dict(ref.named_parameters()), x
    for layer in range(layers):
        outs = [gru_direction(y, *(p[f"{k}_l{layer}{s}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
                              reverse=bool(s)) for s in ("", "_reverse")[:1 + bidirectional]]
        y = torch.cat(outs, dim=-1)
    with torch.no_grad():
        assert (y - ref(x)[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("opt_level", [0, 1, 2])
@pytest.mark.parametrize("layers, bidirectional", CONFIGS)
def test_torch_backend_loads_a_torch_gru_state_dict_and_matches_it(layers, bidirectional, opt_level):
    ref = torch_gru(layers, bidirectional, seed=layers + 2 * bidirectional)
    model = specc.load(gru_spec(layers, bidirectional), opt_level=opt_level)
    model.load_state_dict(prefixed(ref.state_dict()), strict=True)  # every name and shape is torch's
    for seed, (b, t) in enumerate([(1, 1), (3, 7)]):
        (x,) = model.example_inputs(seed=seed, B=b, T=t)
        assert x.dtype == torch.float64
        with torch.no_grad():
            got, want = model(x), ref(x)[0]
        assert got.shape == want.shape == (b, t, H * (1 + bidirectional))
        assert got.dtype == torch.float64
        assert (got - want).abs().max().item() <= TOL


def test_given_weights_by_name_and_generated_module():
    """`weights=` takes the torch GRU's names; model.py holds nn.GRU itself, in the input's dtype."""
    ref = torch_gru(2, True)
    text = gru_spec(2, True)
    model = specc.load(text, opt_level=0, weights=prefixed(ref.state_dict()))
    (x,) = model.example_inputs(B=2, T=4)
    with torch.no_grad():
        assert (model(x) - ref(x)[0]).abs().max().item() <= TOL
    source = artifacts(specc.compile(text), text, "gru.yaml")["model.py"].decode()
    assert f"nn.GRU({D}, {H}, num_layers=2, batch_first=True, bidirectional=True, dtype=torch.float64)" in source
    text32 = gru_spec(1, False, dtype="f32")
    assert f"nn.GRU({D}, {H}, batch_first=True)" in artifacts(specc.compile(text32), text32, "g.yaml")["model.py"].decode()


@pytest.mark.parametrize("dtype, torch_dtype", [("f64", torch.float64), ("f32", torch.float32)])
def test_parameters_names_shapes_dtype_and_init(dtype, torch_dtype):
    """torch.nn.GRU's names and shapes (layer 1 reads 2H in both directions), the input's float dtype,
    U(-1/sqrt(H), 1/sqrt(H)) as torch initialises them."""
    graph = specc.compile(gru_spec(2, True, dtype=dtype))
    weights = init_weights(graph)
    ref = {f"y.{k}": tuple(v.shape) for k, v in torch_gru(2, True).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in weights.items()} == ref
    assert ref["y.weight_ih_l1_reverse"] == (3 * H, 2 * H)
    bound = 1 / H ** 0.5
    for name, w in weights.items():
        assert w.dtype == torch_dtype, name
        assert w.abs().max().item() <= bound and w.std().item() > bound / 4, name


def test_frozen_and_initialiser_options():
    """frozen=, init= (every weight_*), bias_init= (every bias_*), as for every layer with parameters."""
    text = gru_spec(1, True, options=", frozen=true, init=constant(0.5), bias_init=zeros")
    model = specc.load(text)
    params = dict(model.named_parameters())
    assert len(params) == 8 and not any(p.requires_grad for p in params.values())
    for name, p in params.items():
        assert torch.equal(p, torch.full_like(p, 0.0 if ".bias_" in name else 0.5)), name
    shared = spec_text(f"x: 'f64[B, T, {D}]'", f"a = gru(x, {D})\ny = gru(a, {D}, share=a)")
    model = specc.load(shared)
    assert len(dict(model.named_parameters())) == 4  # one GRU's parameters, used twice
    (x,) = model.example_inputs(B=2, T=3)
    gru = torch_gru(1, False, hidden=D)
    gru.load_state_dict({k.split(".", 1)[1]: v for k, v in model.state_dict().items() if k.startswith("a.")})
    with torch.no_grad():
        assert (model(x) - gru(gru(x)[0])[0]).abs().max().item() <= TOL


def test_flops():
    """Per layer and direction, B * T * (6 H (d_in + H) + 16 H), d_in = d, then 2H (bidirectional)."""
    for layers, bidirectional in CONFIGS:
        dirs = 1 + bidirectional
        for b, t in [(2, 5), (3, 11)]:
            want = sum(dirs * b * t * (6 * H * ((D if k == 0 else H * dirs) + H) + 16 * H) for k in range(layers))
            assert flops_of(gru_spec(layers, bidirectional), "gru", B=b, T=t) == want


def test_errors_are_located():
    assert_error(spec_text("x: 'f32[B, 6]'", "y = gru(x, 4)"), 6, 11,
                 "gru: expected a tensor of rank 3 for 'x', got f32[B, 6]")
    assert_error(spec_text("x: 'f32[B, T, 2, 6]'", "y = gru(x, 4)"), 6, 11,
                 "gru: expected a tensor of rank 3 for 'x', got f32[B, T, 2, 6]")
    assert_error(spec_text("x: 'f32[B, T, 6]'", "y = relu(x)\nz = gru(y[:, 0], 3)", "z"), 7, 11,
                 "gru: expected a tensor of rank 3 for 'x', got f32[B, 6]")
    assert_error(spec_text("x: 'i64[B, T, 6]'", "y = gru(x, 4)"), 6, 11,
                 "gru: expected a floating-point tensor for 'x', got i64[B, T, 6]")
    assert_error(spec_text("x: 'f32[B, T, 6]'", "y = gru(x, 0)"), 6, 14, "gru: hidden and layers must be positive")
    assert_error(spec_text("x: 'f32[B, T, 6]'", "y = gru(x, 4, layers=10 ** 9)"), 6, 17,
                 "gru: at most 1024 layers, got 1000000000")


# -- TVM ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, hidden", [
    ("f32", 5),  # gate tiles 3 wide (3H = 15), state vectors 1 wide, polynomial sigmoid/tanh
    ("f64", 16),  # gate tiles 48 wide, state vectors 16 wide, libm
])
def test_tvm_llvm_matches_torch_gru(dtype, hidden):
    """Two layers, both directions, one library at two sizes: a one-step sequence (no recurrent
    product) and a longer one with batch rows in parallel."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    torch_dtype = torch.float32 if dtype == "f32" else torch.float64
    ref = torch_gru(2, True, hidden=hidden, seed=hidden)
    graph = specc.compile(gru_spec(2, True, dtype=dtype, hidden=hidden))
    runner = compile_graph(graph, weights=prefixed(ref.state_dict(), torch_dtype))
    for seed, (b, t) in enumerate([(1, 1), (3, 9)]):
        x = torch.randn(b, t, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        got = runner(x.to(torch_dtype))
        with torch.no_grad():
            want = ref(x)[0]
        assert got.dtype == torch_dtype and got.shape == want.shape
        err = (got.double() - want).abs().max().item()
        bound = TOL_F32 * max(1.0, want.abs().max().item()) if dtype == "f32" else TOL
        assert err <= bound, f"{dtype} at B={b}, T={t}: {err:.3g} > {bound:.3g}"


def test_tvm_cuda_codegen():
    """CUDA C for sm_90 (no GPU needed): the scan kernel of each direction, a thread block per batch
    row with barriers between steps, its gates started from b_hh (w_hh's extra column)."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import device_source, nvcc_compile

    target = {"kind": "cuda", "arch": "sm_90"}
    src = device_source(specc.compile(gru_spec(2, True, dtype="f32", hidden=16)), target)
    for kernel in ("gru_scan_h16_kernel(", "gru_scan_h16_rev_kernel("):
        assert kernel in src
    assert "__syncthreads" in src and "blockIdx.x" in src and "threadIdx.x" in src
    assert "* 17) + 16)]" in src  # acc = w[gate, H]: the bias column of [w_hh, b_hh] [3H, H + 1]
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated, not compiled")
    assert len(nvcc_compile(src, target)) > 0
