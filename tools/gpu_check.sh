#!/usr/bin/env bash
# GPU check of specc's TVM CUDA path: build the zoo for sm_90 here, run it on a GPU machine there.
#
#   tools/gpu_check.sh stage [DIR]   # here (no GPU needed; nvcc is): build and stage into DIR
#                                    #   (default build/gpu_check, git-ignored; about 47 MiB for cuda;
#                                    #   2.5 minutes on 2 cores, nvcc included)
#   tools/gpu_check.sh run [DIR]     # there: run every staged model against torch on the GPU
#   tools/gpu_check.sh cpu-smoke     # here: the same loader on llvm builds of three small models
#
# Through the device tool (its machine gets the working tree plus `carry`, 64 MiB at most, and
# reaches no package registry):
#   tools/gpu_check.sh stage
#   run(command="tools/gpu_check.sh run", carry=["build/gpu_check"], timeout_s=300)
#
# The models: the whole zoo, every spec in specs/ at its defaults (gpt, lora_gpt and peft_gpt at
# T=64): atlas, bt2, coda_prompt, codegen2, counter_current, dann, gelan, glyph_embedding, gpt,
# icl_gpt, itransformer, lora_gpt, lsa_icl, lstm_classifier, memoryformer, moe_router, ngram_head,
# peft_gpt, position_prediction, repvgg, set_prompting, sla, splatflow, timellm, tokenformer,
# transformer_program; gpt_d256 (d_model 256, 4 layers, T 128); and gpu_ops (tests/data/gpu_ops.yaml:
# gru, grouped-query attention with a padding mask, a channels-first layer norm, tensor // and %,
# cumsum, clamp, maximum, stack, flip, amax, max_pool2d, mish, erf, softplus, hardswish, leaky_relu
# and sin, which no zoo spec uses). Each at
# B=1 and B=8, with every output (training-only ones too) compared; integer outputs exactly.
# A model the stage cannot build for CUDA is reported (NOT STAGED, with the reason), the others are
# staged, stage exits 1 and the run counts it as a failure.
#
# What travels (DIR/): runner.py (tools/gpu_runner.py); runtime/ with libtvm_runtime.so (~3 MB),
# libtvm_runtime_cuda.so, libcudart.so.13 and the tvm_ffi package, but NOT libtvm_compiler.so
# (260 MB): the runner imports no `tvm` and loads the libraries with ctypes and tvm_ffi; and per
# model the exported model.so, xz-compressed (a CUDA library keeps its kernels' CUDA source: 34 MB
# for the zoo, under 2 MB packed; the runner unpacks it into a temporary folder), the fatbin nvcc
# compiled from that source, also xz-compressed (TVM 0.27 compiles the CUDA source at load time
# through a callback; the runner's callback returns the staged fatbin, so the GPU machine needs no
# nvcc), the torch module specc's PyTorch backend generates for the same graph and weights (one
# weights.safetensors, bound by both), and inputs at B=1 and B=8 with float64 CPU outputs.
# Largest: gpt_d256 (13 MiB, its weights), memoryformer (8.2), gelan (4.6); runtime/ 10 MiB.
#
# What it prints: per model and batch, max |tvm - torch| (both float32 on the GPU, TF32 off),
# max |tvm - float64 reference|, the output with the largest error relative to its bound, median
# latencies and tvm/torch; exit 1 if a float output's error exceeds 1e-4 * max(1, |its reference|),
# an integer output differs, or a model fails or was not staged. Needs there: python3 of the same
# minor version as here (tvm_ffi's extension; 3.11), torch with CUDA, and an NVIDIA driver for CUDA
# 13 (>= 580; libtvm_runtime_cuda links libcudart.so.13). The runner prints those versions first.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-stage}"
dir="${2:-build/gpu_check}"
case "$cmd" in
  stage)
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
    TVM_CUDA_COMPILE_MODE=nvcc "$py" tools/gpu_stage.py --out "$dir" --target cuda
    ;;
  run)
    python3 "$dir/runner.py" --device cuda
    ;;
  cpu-smoke)
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
    "$py" tools/gpu_stage.py --out build/gpu_check_cpu --target llvm --models tiny,lstm_classifier,set_prompting
    "$py" build/gpu_check_cpu/runner.py --device cpu --iters 5
    ;;
  *)
    echo "usage: tools/gpu_check.sh stage|run|cpu-smoke [DIR]" >&2
    exit 2
    ;;
esac
