"""The TVM backend's CUDA path without a GPU: the IR lowers to Relax, dlight schedules every kernel
(Matmul, GEMV, Reduction, GeneralReduction, Fallback; the LSTM recurrence has its own thread-block
kernel), CUDA C is generated for sm_90, and nvcc (when installed) compiles it. Running the kernels
needs a GPU and is not checked here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("tvm")

import specc  # noqa: E402
from specc.backends.tvm.build import device_source, nvcc_compile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = {"kind": "cuda", "arch": "sm_90"}


@pytest.mark.parametrize("spec, overrides", [
    ("tests/data/tiny.yaml", {}),
    ("specs/lstm_classifier.yaml", dict(vocab=50, d=16, hidden=16, layers=1)),
])
def test_cuda_codegen_and_nvcc(spec, overrides):
    graph = specc.compile(REPO / spec, **overrides)
    src = device_source(graph, TARGET)
    assert "__global__" in src
    assert "threadIdx.x" in src and "blockIdx.x" in src
    if graph.name == "lstm_classifier":
        assert "__syncthreads" in src  # the recurrence kernel's barriers between steps
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated, not compiled")
    assert len(nvcc_compile(src, TARGET)) > 0


#: One spec over the convolutional, mask, position, selection, mixture-of-experts and running-sum ops
MIXED = """\
specc: 1
name: cudamix
dims:
  B: 2
  T: 6
inputs:
  img: f32[B, 3, 8, 8]
  x: f32[B, T, 8]
  ids: i64[B, T] in range(4)
  m: bool[B, T, T]
graph: |
  c = relu(batch_norm(conv2d(img, 4, 3, padding=1)))
  p = max_pool2d(c, 2) + avg_pool2d(c, 2)
  u = upsample(p, mode='bilinear') + upsample(p)
  r = rot90(adaptive_avg_pool2d(u, [2, 2]))
  eye = tril(triu(ones(T, T, dtype=bool)))
  a = attention(rotary(x), heads=2, causal=true, mask=m or eye, prefix=parameter(2, 2, 8))
  e = moe_mlp(a, ids, experts=4, hidden=8) + linear(one_hot(argmax(a), 8), 8)
  g = gather(e, unsqueeze(ids, -1)) + amax(e, dim=-1, keepdim=true)
  y = where(x > 0.0, masked_fill(e, unsqueeze(ids == 2, -1), 1.5), g)
  s = cumsum(clamp(y, min=-1.0, max=2.0), dim=1) + cumsum(maximum(y, x), reverse=true) + amin(y, dim=1, keepdim=true)
  k = cumsum(ids, dim=1) + argmax(s, dim=-1)
  w = mish(erf(s)) + hardswish(sin(s)) * elu(cos(s)) + leaky_relu(rsqrt(softplus(s))) + sign(round(floor(s) + ceil(s)))
  s2 = amax(stack([w, flip(w, [1, 2])], dim=-1), dim=-1)
outputs:
  r: f32[B, 4, 2, 2]
  s2: f32[B, T, 8]
  k: i64[B, T]
"""


def test_cuda_codegen_of_the_other_op_families():
    """dlight schedules every kernel of MIXED (a prefix concat over symbolic lengths included) and nvcc
    compiles the CUDA source."""
    src = device_source(specc.compile(MIXED), TARGET)
    assert "__global__" in src and "threadIdx.x" in src
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA source generated, not compiled")
    assert len(nvcc_compile(src, TARGET)) > 0
