"""The TVM lowering of omega_memory (backends/tvm/lowering_memory.py): the Omega-rule kernel against the
PyTorch backend's loop run in float64, for windows 1 to 5, per-token and scalar lr / gamma / decay,
defaults, float64 inputs, several leading dimensions, and sizes of the symbolic dimensions the library
was not built at (one library). Tolerances: float32 kernels against the float64 loop, max abs error
<= 1e-5 * max(1, max |y|); float64 kernels <= 1e-12 * max(1, max |y|). Also: the CUDA kernel compiles
(code generation only; nothing runs on a GPU here).

memory="mlp" (ATLAS's deep memory): its kernel against the torch loop with the same random initial
weights, windows 1 and 3, with and without the residual, per-token and scalar step sizes, float32 and
float64, at several sizes of B and T from one library; the same tolerances. Its CUDA kernel is generated
and, where nvcc is installed, compiled by nvcc.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("tvm")

import specc  # noqa: E402
from specc.backends.pytorch.weights import init_weights  # noqa: E402
from specc.backends.tvm.build import build_module, compile_graph, device_source, nvcc_compile  # noqa: E402

SPEC = """\
specc: 1
name: omega
dims:
  B: 2
  T: 9
inputs:
  q: {dt}[B, 3, T, 6]
  k: {dt}[B, 3, T, 6]
  v: {dt}[B, 3, T, {dv}]
  lr: {dt}[B, 3, T]
  g: {dt}[B, 3, T]
graph: |
  y = omega_memory(q, k, v, lr, gamma=g, decay=1.0 - 0.5 * g, window={w})
  z = omega_memory(q, k, v, 0.3, window={w})
outputs:
  y:
  z:
"""


def inputs(b: int, t: int, dtype: torch.dtype, seed: int, dv: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, 3, t, 6, generator=gen, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(b, 3, t, dv, generator=gen, dtype=torch.float64)
    lr, g = (torch.rand(b, 3, t, generator=gen, dtype=torch.float64) for _ in range(2))
    return [x.to(dtype) for x in (q, k, v, lr, g)]


@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("dt", ["f32", "f64"])
@pytest.mark.parametrize("dv", [5, 12])  # the CPU kernel's memory rows per task: 1 and 4 side by side
def test_omega_kernel_equals_the_torch_loop(window, dt, dv):
    text = SPEC.format(dt=dt, w=window, dv=dv)
    graph = specc.compile(text)
    runner = compile_graph(graph, weights=init_weights(graph))
    oracle = specc.load(text).double()
    dtype = torch.float32 if dt == "f32" else torch.float64
    tol = 1e-5 if dt == "f32" else 1e-12
    for b, t, seed in ((1, 4, 0), (3, 9, 1), (2, 1, 2)):  # one library, any B and T (T=1: one step)
        xs = inputs(b, t, dtype, seed, dv)
        got = runner(*xs)
        with torch.no_grad():
            want = oracle(*(x.double() for x in xs))
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == w.shape
            assert (g.double() - w).abs().max().item() <= tol * max(1.0, w.abs().max().item()), (window, dt, b, t)


def test_the_cpu_kernels_keep_rows_side_by_side():
    """On the CPU a task of the linear memory runs J memory rows (J the largest of 16, 8, 4, 2, 1 dividing
    dv) in vector lanes, and the MLP memory's kernel its hidden units; on CUDA, a thread per memory row
    and one lane."""
    from specc.backends.tvm.lowering_memory import omega_kernel

    for dv, lanes in ((16, 16), (24, 8), (12, 4), (5, 1)):
        text = omega_kernel(8, dv, 3, "float32").script()
        assert f"T.vectorized({lanes})" in text, (dv, text)
        tasks = "T.parallel(Rn)" if dv == lanes else f"T.parallel(Rn * T.int64({dv // lanes}))"
        assert tasks in text, (dv, text)
    assert "T.vectorized" not in omega_kernel(8, 16, 3, "float32", gpu=True).script()
    # the MLP memory's kernel: the hidden units side by side (W1 held transposed), one lane on CUDA
    from specc.backends.tvm.lowering_memory import omega_mlp_kernel

    for hidden, lanes in ((16, 16), (12, 4), (3, 1)):
        text = omega_mlp_kernel(8, 8, hidden, 2, True, "float32").script()
        assert f"T.vectorized({lanes})" in text and f"T.vectorized({2 * lanes})" not in text, (hidden, text)
    assert "T.vectorized(16)" not in omega_mlp_kernel(8, 8, 16, 2, True, "float32", gpu=True).script()


def test_omega_kernel_compiles_for_cuda():
    graph = specc.compile(SPEC.format(dt="f32", w=3, dv=5))
    ex, _ = build_module(graph, {"kind": "cuda", "arch": "sm_90"})
    assert ex is not None


MLP_SPEC = """\
specc: 1
name: omega_mlp
dims:
  B: 2
  T: 9
inputs:
  q: {dt}[B, 3, T, 6]
  k: {dt}[B, 3, T, 6]
  v: {dt}[B, 3, T, 6]
  lr: {dt}[B, 3, T]
  g: {dt}[B, 3, T]
graph: |
  y = omega_memory(q, k, v, lr, gamma=g, decay=1.0 - 0.5 * g, window={w}, memory='mlp', hidden=4)
  z = omega_memory(q, k, v[:, :, :, :5], 0.2, window={w}, memory='mlp', hidden=3, residual=false)
outputs:
  y:
  z:
"""


def random_weights(graph, seed: int) -> dict[str, torch.Tensor]:
    """The initial memories at a larger scale than their initialiser's (the MLP's non-linearity at work)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: 0.5 * torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype)
            for n, w in init_weights(graph).items()}


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("dt", ["f32", "f64"])
def test_omega_mlp_kernel_equals_the_torch_loop(window, dt):
    text = MLP_SPEC.format(dt=dt, w=window)
    graph = specc.compile(text)
    weights = random_weights(graph, window)
    assert sorted(weights) == ["y.weight1", "y.weight2", "z.weight1", "z.weight2"]
    runner = compile_graph(graph, weights=weights)
    oracle = specc.load(text, weights=weights).double()
    dtype = torch.float32 if dt == "f32" else torch.float64
    tol = 1e-5 if dt == "f32" else 1e-12
    for b, t, seed in ((1, 4, 0), (3, 9, 1), (2, 1, 2)):  # one library, any B and T (T=1: one step)
        xs = inputs(b, t, dtype, seed)
        xs[2] = torch.cat([xs[2], xs[0][..., :1]], dim=-1)  # values of the key width (6)
        xs[3] = 0.5 * xs[3]  # step sizes that keep the memory stable over 9 steps
        got = runner(*xs)
        with torch.no_grad():
            want = oracle(*(x.double() for x in xs))
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == w.shape
            assert 0.1 < w.abs().max() < 10
            assert (g.double() - w).abs().max().item() <= tol * max(1.0, w.abs().max().item()), (window, dt, b, t)


def test_omega_mlp_kernel_compiles_for_cuda():
    graph = specc.compile(MLP_SPEC.format(dt="f32", w=3))
    target = {"kind": "cuda", "arch": "sm_90"}
    ex, _ = build_module(graph, target)
    assert ex is not None
    src = device_source(graph, target)
    for name in ("omega_mlp_scan_k6_v6_h4_w3_kernel", "omega_mlp_scan_k6_v5_h3_w3_nores_kernel"):
        assert f"__global__ void {name}(" in src
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated, not compiled")
    assert len(nvcc_compile(src, target)) > 0
