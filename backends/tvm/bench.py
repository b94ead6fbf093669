"""Latency of a spec under torch eager and under TVM (llvm), same weights, side by side.

    python -m specc.backends.tvm.bench specs/gpt.yaml --set d_model=64 --set layers=2 -B 1 -T 16

Prints, per variant, the median latency of one forward call and its ratio to torch eager. Variants:
the default build (fusion, weight preprocessing lifted out), without lifting, with the CPU named
in the target (`mcpu`; "native" would silently fall back to a generic CPU), and with the dlight
CPU rules; and the first version, which wrote linear as matmul(x, permute_dims(W)). "vm" is the bare VM call on TVM tensors; "runner" adds the DLPack conversion of the
inputs and outputs and the input range check.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch


def median_time(fn: Callable[[], Any], warmup: int = 20, min_time: float = 1.0, min_iters: int = 50) -> float:
    """Median seconds per call, over repeats of `fn` taking at least `min_time` in all."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    import tvm
    from tvm.target import Target, codegen

    from pathlib import Path

    from specc.backends.pytorch.build import artifacts, load_in_memory
    from specc.backends.pytorch.weights import init_weights
    from specc.compiler.frontend import compile_source
    from specc.backends.tvm import lowering
    from specc.backends.tvm.build import compile_graph
    from specc.backends.tvm.runtime import _to_tvm

    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[], help="spec parameter override k=v")
    ap.add_argument("-B", type=int, default=1)
    ap.add_argument("-T", type=int, default=None)
    ap.add_argument("--time", type=float, default=1.0, help="seconds per measurement")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = int(v) if v.lstrip("-").isdigit() else v
    text = Path(args.spec).read_text(encoding="utf-8")
    _, graph = compile_source(text, args.spec, overrides)
    weights = init_weights(graph)
    model = load_in_memory(artifacts(graph, text, args.spec, weights=weights))
    dims = {"B": args.B} | ({"T": args.T} if args.T else {})
    inputs = model.example_inputs(seed=0, **dims)

    print(f"{graph.name}: inputs {[tuple(x.shape) for x in inputs]}, torch {torch.__version__}, "
          f"tvm {tvm.__version__}; ratios are against torch eager with 1 thread (the untuned TVM kernels "
          f"are serial loops)")
    threads = torch.get_num_threads()
    with torch.inference_mode():
        ref = model(*inputs)
        if threads > 1:
            t_many = median_time(lambda: model(*inputs), min_time=args.time)
        torch.set_num_threads(1)
        t_torch = median_time(lambda: model(*inputs), min_time=args.time)
        torch.set_num_threads(threads)
    if threads > 1:
        print(f"  torch eager, {threads} threads                {t_many * 1e6:9.1f} us {t_many / t_torch:6.2f}x")
    print(f"  torch eager, 1 thread                {t_torch * 1e6:9.1f} us   1.00x")

    cpu = codegen.llvm_get_system_cpu()
    variants = [
        ("tvm llvm, linear as matmul(x, W^T)", dict(target="llvm", linear_impl="matmul")),
        ("tvm llvm (lift+fuse)", dict(target="llvm")),
        ("tvm llvm, no lift", dict(target="llvm", lift=False)),
        (f"tvm llvm mcpu={cpu}", dict(target=Target({"kind": "llvm", "mcpu": cpu}))),
        (f"tvm llvm mcpu={cpu} +dlight.cpu", dict(target=Target({"kind": "llvm", "mcpu": cpu}), cpu_schedule=True)),
    ]
    for label, kw in variants:
        impl = kw.pop("linear_impl", lowering.LINEAR_IMPL)
        saved, lowering.LINEAR_IMPL = lowering.LINEAR_IMPL, impl
        try:
            t0 = time.perf_counter()
            runner = compile_graph(graph, weights=weights, **kw)
            t_compile = time.perf_counter() - t0
        finally:
            lowering.LINEAR_IMPL = saved
        out = runner(*inputs)
        err = (out.double() - ref.double()).abs().max().item()
        t_runner = median_time(lambda: runner(*inputs), min_time=args.time)
        tins = [_to_tvm(x, runner.device) for x in inputs]
        main_fn, ws = runner._main, runner._weights
        t_vm = median_time(lambda: main_fn(*tins, *ws), min_time=args.time)
        print(f"  {label:36s} {t_runner * 1e6:9.1f} us {t_runner / t_torch:6.2f}x   (vm {t_vm * 1e6:.1f} us, "
              f"{t_vm / t_torch:.2f}x; compile {t_compile:.1f} s; max|diff| {err:.1e})")


if __name__ == "__main__":
    main()
