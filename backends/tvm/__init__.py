"""The TVM backend: the specc IR lowered to Relax with a BlockBuilder (lowering.py), compiled with
tvm.compile for llvm (CPU) and cuda (build.py), and run on torch tensors through DLPack (runtime.py).

CPU performance: specc's own schedule rules for the fused kernels (schedules.py: matmul / batched
matmul with register tiling, vectorisation and parallel loops; row reductions; injective kernels),
vectorised row kernels for softmax and the norms (rowops.py), vectorisable fast exp/erf/tanh, and
optional MetaSchedule tuning into a persistent database (tuning.py). bench.py compares against
torch eager; tools/gpu_check.sh runs the CUDA builds on a GPU machine.

Needs apache-tvm (tested with apache-tvm==0.27.0, apache-tvm-ffi==0.1.14.post0: MetaSchedule tuning
segfaulted with apache-tvm-ffi 0.1.15.post2); nothing else in specc imports this package.
"""
