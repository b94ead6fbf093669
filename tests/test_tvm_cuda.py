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
