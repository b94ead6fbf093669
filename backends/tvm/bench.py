"""Latency of specs under torch eager and under TVM (llvm), same weights, side by side, with ratios.

    python -m specc.backends.tvm.bench --zoo -B 1 -B 8                 # every spec in specs/, as in BENCHMARKS.md
    python -m specc.backends.tvm.bench specs/gpt.yaml --set d_model=256 --set layers=4 \\
        --set block_size=128 -T 128 -B 1 -B 8 --variants untuned,scheduled,tuned --tuning-db db/

For each spec: the torch module (the PyTorch backend's generated code, eager, torch's default
thread count) and, per variant, ONE compiled TVM library run at every batch size given. Each row:
median latency of one forward call (through the Runner: DLPack in and out, input checks), the
ratio to torch eager at that batch size, and max |tvm - torch|. Torch is timed first, before any
TVM kernel has started TVM's thread pool (whose workers spin for a while after each parallel
kernel: torch right after a TVM call ran about 1.5x slower here); the TVM variants are then timed
in interleaved rounds, so that load from other processes on a shared machine hits them alike.
Variants:

  compiled   torch.compile (inductor, static shapes) of the torch module: not TVM, for comparison
  untuned    the pipeline with no CPU schedules (legalised loops, as first written)
  scheduled  specc's CPU schedules (backends/tvm/schedules.py), the default
  im2col     scheduled, but convolutions as an im2col kernel + matmul instead of one implicit-GEMM kernel
  portable   scheduled, but masked attention's softmax as portable Relax ops (a clamp, softmax and a
             multiply by a row-seen reduction) instead of the CPU row kernel that zeroes empty rows
  nan_dropping  scheduled, but relu, max pools, amax/amin and argmax as Relax's ops, which may drop a nan
             that torch keeps (the default keeps it: a compare and a select more per element)
  nan_portable  scheduled, but max pools, amax/amin and argmax keep a nan as on GPUs: Relax's reduction
             and the same reduction of isnan(x), in place of one TE reduction with a nan-keeping combiner
  tuned      the scheduled build plus MetaSchedule records from --tuning-db (static-shape
             specialisations for the shapes tuned; `tune` first)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

#: Specs measured at other than their defaults: (overrides, fixed dims). gpt at the issue's size
#: (d_model=256, 4 layers, T=128) rather than its small training default.
ZOO_SIZES: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "gpt": ({"d_model": 256, "layers": 4, "block_size": 128}, {"T": 128}),
}


#: Variants that are the scheduled build with a module-level choice of backends/tvm/lowering.py switched.
SWITCHES: dict[str, tuple[str, str]] = {"im2col": ("CONV_IMPL", "im2col"), "portable": ("MASKED_SOFTMAX", "portable"),
                                        "nan_dropping": ("NAN", "drop"),
                                        "nan_portable": ("NAN", "portable")}


def zoo() -> list[tuple[str, dict[str, Any], dict[str, int]]]:
    """Every spec of the zoo (specs/*.yaml, the repository's own), at its default sizes unless ZOO_SIZES
    says otherwise: (path, overrides, fixed dims)."""
    root = Path(__file__).resolve().parents[2] / "specs"
    return [(str(p), *ZOO_SIZES.get(p.stem, ({}, {}))) for p in sorted(root.glob("*.yaml"))]


def max_diff(got: Any, ref: Any) -> float:
    """max |got - ref| over a model's outputs (one tensor or a tuple of them), in float64."""
    if isinstance(ref, (tuple, list)):
        return max((max_diff(g, r) for g, r in zip(got, ref, strict=True)), default=0.0)
    if got.numel() == 0:
        return 0.0
    return (got.double() - ref.double()).abs().max().item()


def median_time(fn: Callable[[], Any], warmup: int = 3, min_time: float = 1.0, min_iters: int = 5,
                max_iters: int = 2000) -> float:
    """Median seconds per call, over at least `min_iters` calls and `min_time` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in items:
        k, v = kv.split("=", 1)
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def interleaved(fns: dict[str, Callable[[], Any]], min_time: float, rounds: int = 5,
                min_calls: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds (each round times every
    function for min_time / rounds) so that a load that comes and goes on a shared machine hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            n = 0
            while n < min_calls or time.perf_counter() - start < min_time / rounds:
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
                n += 1
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_spec(path: str, overrides: dict[str, Any], fixed: dict[str, int], batches: list[int],
               variants: list[str], tuning_db: str | None, min_time: float, out=print,
               opt_level: int = 1) -> list[dict[str, Any]]:
    """Measure one spec, optimised at `opt_level` (both backends run that graph); returns the rows (and
    prints them)."""
    import tvm

    from specc.backends.pytorch.build import artifacts, load_in_memory
    from specc.backends.pytorch.weights import init_weights, materialise
    from specc.backends.tvm.build import compile_graph
    from specc.compiler.frontend import compile_source
    from specc.compiler.passes import PassContext, optimize

    text = Path(path).read_text(encoding="utf-8")
    _, source = compile_source(text, path, overrides)
    ctx = PassContext(opt_level=opt_level)
    base = init_weights(source)
    graph, _ = optimize(source, ctx)
    weights = materialise(graph, base)
    model = load_in_memory(artifacts(source, text, path, weights=base, ctx=ctx))  # the same graph, optimised there
    model.eval()
    inputs = {b: model.example_inputs(seed=0, **({"B": b} | fixed)) for b in batches}
    shapes = ", ".join(f"B={b}: {[tuple(x.shape) for x in inputs[b]]}" for b in batches)
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"{graph.name} {overrides or ''} -O{opt_level} inputs {shapes}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), tvm {tvm.__version__} "
        f"(TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'default')}); load average {load:.1f}")
    # torch first, before TVM's thread pool exists (its workers spin after each parallel kernel)
    rows: list[dict[str, Any]] = []
    refs, t_torch, t_compiled = {}, {}, {}
    with torch.inference_mode():
        for b in batches:
            refs[b] = model(*inputs[b])
            t_torch[b] = median_time(lambda: model(*inputs[b]), min_time=min_time * 2)
    err_compiled: dict[int, float] = {}
    if "compiled" in variants:  # torch.compile (inductor, static shapes) of the same module, at each batch size
        from torch import _dynamo

        _dynamo.reset()
        compiled = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            for b in batches:
                t0 = time.perf_counter()
                try:
                    got = compiled(*inputs[b])
                except Exception as e:  # noqa: BLE001 - no C++ compiler, an unsupported op...: not TVM's concern
                    out(f"  torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); left out")
                    t_compiled.clear()
                    break
                first = time.perf_counter() - t0
                err_compiled[b] = max_diff(got, refs[b])
                t_compiled[b] = median_time(lambda: compiled(*inputs[b]), min_time=min_time * 2)
                out(f"  torch.compile B={b}: first call (compiling) {first:.1f} s")
    runners: dict[str, Any] = {}
    build_s: dict[str, float] = {}
    for variant in variants:
        kw: dict[str, Any] = {}
        if variant == "compiled":
            continue
        if variant == "untuned":
            kw["schedule"] = "none"
        elif variant == "tuned":
            if not tuning_db:
                out("  tuned: skipped (no --tuning-db)")
                continue
            kw["tuning_db"] = tuning_db
        elif variant != "scheduled" and variant not in SWITCHES:
            raise SystemExit(f"unknown variant {variant}")
        t0 = time.perf_counter()
        if variant in SWITCHES:  # the scheduled build with one lowering choice switched, for comparison
            from specc.backends.tvm import lowering

            name, value = SWITCHES[variant]
            previous = getattr(lowering, name)
            setattr(lowering, name, value)
            try:
                runners[variant] = compile_graph(graph, weights=weights)
            finally:
                setattr(lowering, name, previous)
        else:
            runners[variant] = compile_graph(graph, weights=weights, **kw)
        build_s[variant] = time.perf_counter() - t0
        out(f"  compiled {variant} in {build_s[variant]:.1f} s")
    for b in batches:
        rows.append(dict(model=graph.name, variant="torch eager", B=b, ms=t_torch[b] * 1e3, ratio=1.0, err=0.0))
        out(f"  {'torch eager':12s} B={b:<3d} {t_torch[b] * 1e3:9.3f} ms   1.00x")
        if b in t_compiled:
            ratio = t_compiled[b] / t_torch[b]
            rows.append(dict(model=graph.name, variant="compiled", B=b, ms=t_compiled[b] * 1e3, ratio=ratio,
                             err=err_compiled[b]))
            out(f"  {'torch.compile':12s}B={b:<3d} {t_compiled[b] * 1e3:9.3f} ms {ratio:6.2f}x   "
                f"max|diff| {err_compiled[b]:.1e}")
        fns, errs = {}, {}
        for v, r in runners.items():
            errs[v] = max_diff(r(*inputs[b]), refs[b])
            fns[v] = (lambda r=r: r(*inputs[b]))
        times = interleaved(fns, min_time * len(fns)) if fns else {}
        for v, t in times.items():
            ratio = t / t_torch[b]
            rows.append(dict(model=graph.name, variant=v, B=b, ms=t * 1e3, ratio=ratio, err=errs[v],
                             function=runners[v].last_function, build_s=build_s[v]))
            out(f"  {v:12s} B={b:<3d} {t * 1e3:9.3f} ms {ratio:6.2f}x   max|diff| {errs[v]:.1e}"
                f"   ({runners[v].last_function})")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", nargs="*")
    ap.add_argument("--zoo", action="store_true", help="every spec in specs/ at its defaults (gpt at d_model=256, 4 layers, T=128)")
    ap.add_argument("--set", action="append", default=[], help="spec parameter override k=v")
    ap.add_argument("-B", type=int, action="append", help="batch size (repeatable; default 1 and 8)")
    ap.add_argument("-T", type=int, default=None, help="length, for specs with a symbolic T")
    ap.add_argument("--variants", default="compiled,untuned,scheduled,tuned")
    ap.add_argument("--tuning-db", default=None)
    ap.add_argument("--time", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=1,
                    help="specc's optimisation level for both backends (default 1, as `specc build`; a "
                         "--tuning-db must have been tuned at the same level)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both torch and TVM's runtime (default: each library's default, the "
                         "physical cores); 1 gives stable numbers on a machine other processes load")
    args = ap.parse_args(argv)
    if args.threads:
        import os

        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
        torch.set_num_threads(args.threads)
    batches = args.B or [1, 8]
    jobs = zoo() if args.zoo else []
    jobs += [(s, _overrides(args.set), {"T": args.T} if args.T else {}) for s in args.spec]
    if not jobs:
        ap.error("name a spec or --zoo")
    rows = []
    for path, ov, fixed in jobs:
        rows += bench_spec(path, ov, fixed, batches, args.variants.split(","), args.tuning_db, args.time,
                           opt_level=args.opt_level)
    variants = args.variants.split(",")
    print("\n| model | B | torch eager ms | " + " | ".join(
        "torch.compile" if v == "compiled" else v for v in variants) + " | max abs diff (scheduled) |")
    print("|---|---|---|" + "---|" * (len(variants) + 1))
    for model in dict.fromkeys(r["model"] for r in rows):
        for b in batches:
            cells = {r["variant"]: r for r in rows if r["model"] == model and r["B"] == b}
            line = [f"{cells['torch eager']['ms']:.2f}"]
            line += [f"{cells[v]['ratio']:.2f}x" if v in cells else "-" for v in variants]
            line.append(f"{cells['scheduled']['err']:.1e}" if "scheduled" in cells else "-")
            print(f"| {model} | {b} | " + " | ".join(line) + " |")
    built = [v for v in variants if v != "compiled"]
    print("\nTVM build time, s (one library per variant, every batch size):\n")
    print("| model | " + " | ".join(built) + " |")
    print("|---|" + "---|" * len(built))
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = {r["variant"]: r for r in rows if r["model"] == model and "build_s" in r}
        print(f"| {model} | " + " | ".join(f"{cells[v]['build_s']:.1f}" if v in cells else "-" for v in built) + " |")


if __name__ == "__main__":
    main()
