"""The benchmark: specc's generated models against hand-written PyTorch, side by side in one run,
and the compiler's own speed.

    python -m bench.run                       # full run (~10-15 min on 2 cores), writes BENCHMARKS.md
    python -m bench.run --quick               # smoke run (~2 min), prints only
    python -m bench.run --quick --out x.md    # ... and writes x.md

For every zoo spec with a hand-written reference (bench/references.py), at batch 1 and 8, on the CPU
with a fixed number of threads, under torch.no_grad():

    ref eager      the hand-written eager PyTorch reference (weights loaded from the specc build)
    specc -O0      the generated model, unoptimised
    specc -O2      the generated model, all exact passes
    ref compiled   torch.compile(reference)
    -O2 compiled   the specc -O2 build made with torch_compile=True (its load() calls torch.compile)

Each variant's output is first compared with the eager reference (max abs error printed; a variant
off by more than TOL * max(1, max|ref|) is marked MISMATCH). Then the variants are timed interleaved:
in every round each variant runs k >= 3 calls, the order rotating from round to round, so that a
noisy neighbour slows all of them alike. A round's time of a variant is its fastest of those k calls
(a call that lost the CPU to another process says nothing about the code); the time of a variant is
the median over rounds of that, and a ratio of two variants is the median over rounds of the ratio of
their times in the same round (neighbours in time), with the interquartile range of those per-round
ratios as its spread. The median over all calls is printed too. torch.compile state is reset before
each batch size, so every compiled variant is specialised to its batch (static shapes).

Also: the time to check and build each zoo spec, and the compile-time scaling on generated specs of
about 1,000 and 10,000 nodes (time per node, and the growth exponent: 1.0 is linear).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import specc
from bench.references import CASES, Case, load_reference
from specc.backends.pytorch.build import import_model_module
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
TOL = 1e-4  # max abs error vs the eager reference, relative to max(1, max|ref|)
REF, O0, O2, REF_C, O2_C = "ref eager", "specc -O0", "specc -O2", "ref compiled", "-O2 compiled"
VARIANTS = (REF, O0, O2, REF_C, O2_C)


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + (" + uncommitted changes" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "logical cpus": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "specc commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load average at start": loadavg(),
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, calls: int,
                     deadline: float = math.inf, min_rounds: int = 3) -> dict[str, list[list[float]]]:
    """Per variant, per round, the seconds of each call. The variants alternate in every round and
    the order rotates, so slow spells of a shared machine hit all of them. Stops early, after a
    whole round, once `deadline` (a time.perf_counter() value) has passed and min_rounds are done."""
    names = list(fns)
    samples: dict[str, list[list[float]]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            if r >= min_rounds and time.perf_counter() > deadline:
                break
            k = r % len(names)
            for n in names[k:] + names[:k]:
                f, times = fns[n], []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    f()
                    times.append(time.perf_counter() - t0)
                samples[n].append(times)
    finally:
        gc.enable()
    return samples


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; (0, 0) where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class OtherLoad:
    """How many CPU cores other processes kept busy, on average, between start() and stop()."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t, self.cpu, self.own = time.perf_counter(), _cpu_jiffies(), os.times()

    def stop(self) -> float:
        wall = time.perf_counter() - self.t
        busy, total = _cpu_jiffies()
        if not total or wall <= 0:
            return math.nan
        hz = os.sysconf("SC_CLK_TCK")
        own = os.times()
        own_s = (own.user + own.system) - (self.own.user + self.own.system)
        return max(0.0, ((busy - self.cpu[0]) / hz - own_s) / wall)


def wait_for_quiet(max_wait: float, cores: float = 0.5) -> float:
    """Wait (up to max_wait seconds, probing each second) until other processes use fewer than
    `cores` CPU cores; the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        probe = OtherLoad()
        time.sleep(1.0)
        if not probe.stop() >= cores:  # NaN (no /proc/stat) counts as quiet
            break
    return time.perf_counter() - t0


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


# ---------------------------------------------------------------------------------------------
# one zoo spec against its reference
# ---------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    ms: float = math.nan            # median over rounds of the round's fastest call (the headline time)
    median_ms: float = math.nan     # median over all calls (slow spells of a shared machine included)
    min_ms: float = math.nan        # fastest call of all
    ratio: float = math.nan         # median over rounds of (this round's time / the reference's)
    spread: tuple[float, float] = (math.nan, math.nan)  # IQR of the per-round ratios
    max_err: float = math.nan       # max abs error vs the eager reference
    ok: bool = True                 # within TOL
    warmup_s: float = math.nan      # the first call (torch.compile compiles here)
    calls: int = 0
    rounds: list[float] = field(default_factory=list)  # per round: seconds of its fastest call
    error: str = ""                 # why it did not run


@dataclass
class BatchResult:
    batch: int
    variants: dict[str, Variant] = field(default_factory=dict)
    scale: float = 1.0               # max(1, max|ref|), for the tolerance
    other_cores: float = math.nan    # CPU cores other processes kept busy while this batch was timed
    waited_s: float = 0.0            # waited for the machine to quieten before timing

    def ratio(self, a: str, b: str) -> float:
        """Time of a / time of b: the median over rounds of the ratio of their times in a round."""
        va, vb = self.variants.get(a), self.variants.get(b)
        if not va or not vb or va.error or vb.error or not va.rounds:
            return math.nan
        return statistics.median(x / y for x, y in zip(va.rounds, vb.rounds))


@dataclass
class CaseResult:
    case: Case
    params: dict[str, Any]
    passes: list[str]               # the -O2 passes that changed the graph
    nodes: tuple[int, int]          # IR nodes before and after -O2
    batches: list[BatchResult] = field(default_factory=list)
    error: str = ""


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(directory) / "weights.safetensors"))


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return math.inf
    return (got.double() - want.double()).abs().max().item()


def bench_case(case: Case, overrides: dict[str, Any], batches: tuple[int, ...], *, rounds: int,
               seconds: float, compile_batches: tuple[int, ...] = (), log: Callable[[str], None] = print,
               tmp: Path | None = None, quiet_wait: float = 0.0) -> CaseResult:
    """Build the spec at -O0 and -O2 (and -O2 with torch_compile when asked), load the reference
    from the -O0 weights, check every variant against it, and time them side by side."""
    own_tmp = tempfile.TemporaryDirectory(prefix="specc-bench-") if tmp is None else None
    tmp = Path(own_tmp.name) if own_tmp else tmp
    try:
        spec = SPECS / f"{case.spec}.yaml"
        dirs = {O0: tmp / f"{case.spec}-O0", O2: tmp / f"{case.spec}-O2", O2_C: tmp / f"{case.spec}-O2-tc"}
        specc.build(spec, dirs[O0], opt_level=0, **overrides)
        specc.build(spec, dirs[O2], opt_level=2, **overrides)
        if compile_batches:
            specc.build(spec, dirs[O2_C], opt_level=2, torch_compile=True, **overrides)
        manifest = json.loads((dirs[O2] / "manifest.json").read_text())
        params = manifest["params"]
        result = CaseResult(case, params, [p["pass"] for p in manifest.get("passes", [])],
                            tuple(manifest["graph"]["nodes"]))
        ref = load_reference(case, read_weights(dirs[O0]), params)
        models: dict[str, Any] = {REF: ref, O0: import_model_module(dirs[O0]).load(dirs[O0]),
                                  O2: import_model_module(dirs[O2]).load(dirs[O2])}
        if compile_batches:
            models[REF_C] = torch.compile(ref)
            module = import_model_module(dirs[O2_C])
            assert module.TORCH_COMPILE, "a build with torch_compile=True must compile in load()"
            models[O2_C] = module.load(dirs[O2_C])
        for i, batch in enumerate(batches):
            result.batches.append(bench_batch(case, params, models, batch, rounds=rounds, seconds=seconds,
                                              compiled=batch in compile_batches, log=log, flip=i % 2 == 1,
                                              quiet_wait=quiet_wait))
        return result
    finally:
        if own_tmp:
            own_tmp.cleanup()


def bench_batch(case: Case, params: dict[str, Any], models: dict[str, Any], batch: int, *, rounds: int,
                seconds: float, compiled: bool, log: Callable[[str], None], flip: bool = False,
                quiet_wait: float = 0.0) -> BatchResult:
    """`flip`: compile the -O2 build before the reference (the second compile finds kernels of the
    first in inductor's cache, so the two alternate in paying for them)."""
    inputs = case.inputs(batch, params, 0)
    res = BatchResult(batch)
    names = [n for n in VARIANTS if n in models and (compiled or n not in (REF_C, O2_C))]
    if flip and REF_C in names and O2_C in names:
        names = [n for n in names if n not in (REF_C, O2_C)] + [O2_C, REF_C]
    if compiled:
        torch._dynamo.reset()  # compile afresh for this batch size: static shapes, no reuse
    fns: dict[str, Callable[[], Any]] = {}
    with torch.no_grad():
        want = models[REF](*inputs)
        res.scale = max(1.0, want.abs().max().item())
        for name in names:
            v = res.variants[name] = Variant(name)
            model = models[name]
            try:
                t0 = time.perf_counter()
                got = model(*inputs)
                v.warmup_s = time.perf_counter() - t0
                for _ in range(2):
                    got = model(*inputs)
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                v.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                log(f"  {case.spec} B={batch} {name}: FAILED {v.error}")
                continue
            v.max_err = max_error(got, want)
            v.ok = v.max_err <= TOL * res.scale
            fns[name] = (lambda m=model: m(*inputs))
        # calls per round from the eager reference's time, so each variant gets about `seconds`
        probe = []
        for _ in range(5):
            t0 = time.perf_counter()
            fns[REF]()
            probe.append(time.perf_counter() - t0)
        per_call = max(statistics.median(probe), 1e-5)
        calls = max(3, min(200, round(seconds / rounds / per_call)))
        # a loaded machine has a long tail of slow calls: cap the wall time at twice the plan
        res.waited_s = wait_for_quiet(quiet_wait) if quiet_wait > 0 else 0.0
        load = OtherLoad()
        samples = time_interleaved(fns, rounds, calls, deadline=time.perf_counter() + 2 * seconds * len(fns),
                                   min_rounds=min(rounds, 8))
        res.other_cores = load.stop()
    for name, rs in samples.items():
        v = res.variants[name]
        v.calls = sum(len(r) for r in rs)
        v.median_ms = statistics.median([t for r in rs for t in r]) * 1e3
        v.min_ms = min(t for r in rs for t in r) * 1e3
        # a round's time is its fastest call: a call that lost the CPU to another process (on a shared
        # 2-core machine, often) says nothing about the code; rounds that were slow throughout, and
        # lucky ones, drop out in the median over rounds
        v.rounds = [min(r) for r in rs]
        v.ms = statistics.median(v.rounds) * 1e3
    for v in res.variants.values():
        if v.rounds:
            lo, v.ratio, hi = quartiles([a / b for a, b in zip(v.rounds, res.variants[REF].rounds)])
            v.spread = (lo, hi)
    line = "  ".join(f"{n} {v.ms:.2f} ms" + ("" if v.ok else " MISMATCH")
                     for n, v in res.variants.items() if not v.error)
    log(f"  {case.spec} B={batch}: {line}  (other processes: {_f(res.other_cores)} cores)")
    return res


# ---------------------------------------------------------------------------------------------
# the compiler's own time
# ---------------------------------------------------------------------------------------------

@dataclass
class SpecTimes:
    spec: str
    params: str
    nodes: int = 0
    nodes_o2: int = 0
    check_ms: float = math.nan
    build_o0_ms: float = math.nan
    build_o2_ms: float = math.nan
    error: str = ""


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds (compile times: the minimum is the least noisy)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def spec_times(spec: Path, overrides: dict[str, Any], repeats: int, tmp: Path) -> SpecTimes:
    st = SpecTimes(spec.stem, ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults")
    try:
        st.check_ms = best_of(lambda: specc.check(spec, **overrides), repeats) * 1e3
        st.nodes = len(specc.compile(spec, **overrides))
        st.build_o0_ms = best_of(lambda: specc.build(spec, tmp / f"{spec.stem}-t0", opt_level=0, **overrides),
                                 repeats) * 1e3
        st.build_o2_ms = best_of(lambda: specc.build(spec, tmp / f"{spec.stem}-t2", opt_level=2, **overrides),
                                 repeats) * 1e3
        st.nodes_o2 = json.loads((tmp / f"{spec.stem}-t2" / "manifest.json").read_text())["graph"]["nodes"][1]
    except Exception as e:  # noqa: BLE001 - a zoo spec that does not build is reported
        st.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return st


# generated specs for compile-time scaling: every statement kind the passes rewrite is in the mix
_CHAIN_OPS = (
    "tanh({v})",
    "linear({v}, {d})",
    "layer_norm({v})",
    "linear(linear({v}, {h}, bias=false), {d})",          # merge_linear_chains
    "{v} * 1 + 0",                                        # fold_constants
    "gelu({v})",
    "dropout({v}, p=0.1)",                                # eliminate_identity (inference)
    "transpose(sigmoid(transpose({v}, 1, 2)), 2, 1)",
    "{v} + tanh({p}) * tanh({p})",                        # cse
    "attention(layer_norm({v}), heads=2)",                # fuse_qkv, attention_sdpa
    "reshape(reshape({v}, B, T, 2, {d2}), B, T, {d})",    # eliminate_identity
    "rms_norm({v}) * 0.5 + {p}",
)


def chain_spec(statements: int, d: int = 8) -> str:
    """A flat graph body of `statements` statements cycling through _CHAIN_OPS."""
    lines, prev, before = [], "x", "x"
    for i in range(statements):
        expr = _CHAIN_OPS[i % len(_CHAIN_OPS)].format(v=prev, p=before, d=d, h=2 * d, d2=d // 2)
        lines.append(f"  v{i} = {expr}")
        before, prev = prev, f"v{i}"
    return (f"specc: 1\nname: chain{statements}\ndims:\n  B: 2\n  T: 4\ninputs:\n  x: f32[B, T, {d}]\n"
            f"graph: |\n" + "\n".join(lines) + f"\noutputs:\n  {prev}: f32[B, T, {d}]\n")


def repeat_spec(times: int, d: int = 8) -> str:
    """A block of about twenty operations, chained `times` times with repeat()."""
    return f"""specc: 1
name: repeat{times}
dims:
  B: 2
  T: 4
inputs:
  x: f32[B, T, {d}]
blocks:
  unit(h): |
    a = h + attention(layer_norm(h), heads=2, causal=true)
    b = linear(linear(rms_norm(a), {2 * d}, bias=false), {d})
    c = dropout(gelu(b) * 1, p=0.1) + a
    e = transpose(tanh(transpose(c, 1, 2)), 2, 1)
    return e + mlp(layer_norm(e), hidden={2 * d}, act=silu)
graph: |
  y = repeat({times}, unit, x)
outputs:
  y: f32[B, T, {d}]
"""


@dataclass
class ScaleRow:
    family: str
    nodes: int
    check_s: float
    ir_s: float
    build_s: float


def sized(family: str, target: int) -> str:
    """A spec of the family with about `target` IR nodes (calibrated on a small one)."""
    make = chain_spec if family == "chain" else repeat_spec
    unit = 48 if family == "chain" else 4
    per_unit = len(specc.compile(make(unit))) / unit
    return make(max(1, round(target / per_unit)))


def scaling(targets: tuple[int, ...], repeats: int, tmp: Path, log: Callable[[str], None] = print) -> list[ScaleRow]:
    rows = []
    for family in ("chain", "repeat"):
        for target in targets:
            text = sized(family, target)
            nodes = len(specc.compile(text))
            reps = repeats if nodes <= 2000 else max(1, repeats - 1)

            def ir() -> str:
                graph, _ = optimize(specc.compile(text), PassContext(opt_level=2))
                return print_graph(graph)

            row = ScaleRow(family, nodes,
                           best_of(lambda: specc.check(text), reps),
                           best_of(ir, reps),
                           best_of(lambda: specc.build(text, tmp / f"scale-{family}", opt_level=2), reps))
            log(f"  {family} {nodes} nodes: check {row.check_s:.2f} s, ir -O2 {row.ir_s:.2f} s, "
                f"build -O2 {row.build_s:.2f} s")
            rows.append(row)
    return rows


def growth(rows: list[ScaleRow], family: str, attr: str) -> float:
    """The exponent k in time ~ nodes^k between the smallest and the largest spec of a family."""
    fam = sorted((r for r in rows if r.family == family), key=lambda r: r.nodes)
    if len(fam) < 2:
        return math.nan
    a, b = fam[0], fam[-1]
    return math.log(getattr(b, attr) / getattr(a, attr)) / math.log(b.nodes / a.nodes)


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------

def _f(x: float, fmt: str = "{:.2f}") -> str:
    return "—" if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else fmt.format(x)


def model_table(results: list[CaseResult]) -> list[list[str]]:
    """One row per spec, batch and variant: ms, x ref eager (with spread), max error, status."""
    rows = [["spec", "batch", "variant", "ms", "x ref eager", "per-round IQR", "median of all calls ms",
             "max abs err", "first call s", "calls"]]
    for cr in results:
        if cr.error:
            rows.append([cr.case.spec, "", "", "", "", "", "", "", "", cr.error])
            continue
        for br in cr.batches:
            for v in (br.variants[n] for n in VARIANTS if n in br.variants):
                if v.error:
                    rows.append([cr.case.spec, str(br.batch), v.name, "failed", "", "", "", "", "", v.error])
                    continue
                err = _f(v.max_err, "{:.1e}") + ("" if v.ok else " MISMATCH")
                rows.append([cr.case.spec, str(br.batch), v.name, _f(v.ms), _f(v.ratio),
                             f"{_f(v.spread[0])}–{_f(v.spread[1])}", _f(v.median_ms), err, _f(v.warmup_s, "{:.1f}"), str(v.calls)])
    return rows


def ratio_table(results: list[CaseResult]) -> list[list[str]]:
    """The headline: each ratio of a spec and batch in one row."""
    rows = [["spec", "batch", "ref eager ms", "-O0 / ref", "-O2 / ref", "ref compiled / ref",
             "-O2 compiled / ref", "-O2 compiled / ref compiled", "-O2 / ref, medians of all calls",
             "other processes, cores"]]
    for cr in results:
        for br in cr.batches:
            ref = br.variants[REF]
            o2 = br.variants.get(O2)
            best = o2.median_ms / ref.median_ms if o2 and not o2.error and not ref.error else math.nan
            rows.append([cr.case.spec, str(br.batch), _f(ref.ms), _f(br.ratio(O0, REF)), _f(br.ratio(O2, REF)),
                         _f(br.ratio(REF_C, REF)), _f(br.ratio(O2_C, REF)), _f(br.ratio(O2_C, REF_C)), _f(best),
                         _f(br.other_cores)])
    return rows


def spec_table(rows: list[SpecTimes]) -> list[list[str]]:
    out = [["spec", "params", "IR nodes (-O0 → -O2)", "check ms", "build -O0 ms", "build -O2 ms"]]
    for st in rows:
        if st.error:
            out.append([st.spec, st.params, "", "", "", st.error])
        else:
            out.append([st.spec, st.params, f"{st.nodes} → {st.nodes_o2}", _f(st.check_ms, "{:.0f}"),
                        _f(st.build_o0_ms, "{:.0f}"), _f(st.build_o2_ms, "{:.0f}")])
    return out


def scale_table(rows: list[ScaleRow]) -> list[list[str]]:
    out = [["spec", "IR nodes", "check s", "µs/node", "ir -O2 s", "µs/node", "build -O2 s", "µs/node"]]
    for r in rows:
        out.append([r.family, str(r.nodes), _f(r.check_s), _f(r.check_s / r.nodes * 1e6, "{:.0f}"),
                    _f(r.ir_s), _f(r.ir_s / r.nodes * 1e6, "{:.0f}"), _f(r.build_s),
                    _f(r.build_s / r.nodes * 1e6, "{:.0f}")])
    for family in dict.fromkeys(r.family for r in rows):
        out.append([family, "growth exponent", "", _f(growth(rows, family, "check_s")), "",
                    _f(growth(rows, family, "ir_s")), "", _f(growth(rows, family, "build_s"))])
    return out


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


@dataclass
class Verdict:
    target: str
    spec: str
    value: str
    met: str


def verdicts(results: list[CaseResult], scale: list[ScaleRow]) -> list[Verdict]:
    """The issue's targets, judged on this run's numbers: 'met' when the median ratio is at or under
    the target and its per-round IQR does not reach over it, 'at the target, within noise' when the
    IQR straddles the target, 'not met' when the whole IQR is over it."""
    out = []

    def judge(ratio: float, spread: tuple[float, float], limit: float) -> str:
        if math.isnan(ratio):
            return "not measured"
        if spread[0] <= limit < spread[1]:
            return "at the target, within noise"
        return "met" if ratio <= limit else "not met"

    for cr in results:
        for br in cr.batches:
            v = br.variants.get(O2)
            if v and not v.error:
                out.append(Verdict("-O2 <= 1.0 x ref eager", f"{cr.case.spec} B={br.batch}", _f(v.ratio, "{:.3f}"),
                                   judge(v.ratio, v.spread, 1.0) if v.ok else "MISMATCH"))
    own = [cr for cr in results if cr.case.own_rewrites]
    for cr in own:
        for br in cr.batches:
            v = br.variants.get(O2)
            if v and not v.error:
                out.append(Verdict("-O2 <= 0.8 x ref eager (own rewrites)", f"{cr.case.spec} B={br.batch}",
                                   _f(v.ratio, "{:.3f}"), judge(v.ratio, v.spread, 0.8)))
            r = br.ratio(O2_C, REF_C)
            if not math.isnan(r):
                out.append(Verdict("-O2 compiled <= 0.9 x ref compiled (own rewrites)",
                                   f"{cr.case.spec} B={br.batch}", _f(r, "{:.3f}"), "met" if r <= 0.9 else "not met"))
    if not own:
        out.append(Verdict("-O2 <= 0.8 x ref eager (own rewrites)", "—", "—",
                           "not measurable: no zoo spec with a reference exercises conv+BN, RepConv, LoRA merge, "
                           "lookup folding or training-only branches"))
        out.append(Verdict("-O2 compiled <= 0.9 x ref compiled (own rewrites)", "—", "—", "not measurable (as above)"))
    for family in dict.fromkeys(r.family for r in scale):
        k = max(growth(scale, family, a) for a in ("check_s", "ir_s", "build_s"))
        out.append(Verdict("compile time ~linear in graph size", f"{family} specs", f"exponent {_f(k)}",
                           "met" if k <= 1.15 else ("roughly (<= 1.3)" if k <= 1.3 else "not met")))
    return out


NOTES_BEGIN, NOTES_END = "<!-- notes: kept across runs -->", "<!-- /notes -->"


def markdown(info: dict[str, str], results: list[CaseResult], specs: list[SpecTimes], scale: list[ScaleRow],
             settings: str, notes: str) -> str:
    parts = ["# Benchmarks", "",
             "Generated by `python -m bench.run` (bench/run.py); the numbers below are from one run, measured "
             "side by side. Times are CPU, float32, `torch.no_grad()`.", "",
             "## Machine", ""]
    parts += [f"- {k}: {v}" for k, v in info.items()]
    parts += ["", f"Settings: {settings}", "",
              "## Targets", "", md_table([["target", "where", "value", "verdict"]] +
                                         [[v.target, v.spec, v.value, v.met] for v in verdicts(results, scale)]),
              "", NOTES_BEGIN, notes.strip() or "_(no notes yet)_", NOTES_END, "",
              "## Ratios (time / time of the eager reference, median over interleaved rounds, one run)", "",
              md_table(ratio_table(results)), "",
              "## Models", "",
              "Per variant: ms = the median over rounds of the round's fastest call (each round runs every "
              "variant k >= 3 times, interleaved); its ratio to the eager reference (median over rounds of "
              "the ratio within a round) and that ratio's interquartile range over rounds; the median of all "
              "calls (slow spells of the shared machine included); the max abs error against the eager "
              "reference; the first call (for the compiled variants: torch.compile itself, with an inductor "
              "cache that starts empty in a full run, so the second of the two compiles of a batch may find "
              "some kernels already built; the order alternates between batches).", ""]
    for cr in results:
        if cr.error:
            parts += [f"- **{cr.case.spec}**: {cr.error}"]
            continue
        size = ", ".join(f"{k}={v}" for k, v in cr.params.items())
        parts += [f"- **{cr.case.spec}** ({cr.case.size}; bound params: {size}). IR nodes {cr.nodes[0]} → "
                  f"{cr.nodes[1]} at -O2; passes that changed the graph: {', '.join(cr.passes) or 'none'}. "
                  f"Rewrites that can apply: {cr.case.rewrites}."]
    parts += ["", md_table(model_table(results)), "",
              "## The compiler's own time per zoo spec (best of several runs)", "", md_table(spec_table(specs)), "",
              "## Compile-time scaling on generated specs (best of runs)", "",
              "`chain`: a flat graph body cycling through twelve statement kinds (linear chains, neutral "
              "arithmetic, dropout, transposes, repeated subexpressions, attention, reshapes, norms); "
              "`repeat`: a block of about twenty operations chained with `repeat()`. check = "
              "`specc.check`, ir = parse + elaborate + all -O2 passes + IR text, build = `specc.build(opt_level=2)` "
              "(weights and files included). Growth exponent k in time ∝ nodes^k between the smallest and "
              "largest spec: 1.0 is linear.", "", md_table(scale_table(scale)), ""]
    return "\n".join(parts)


#: Headings of the sections this report writes; other sections of BENCHMARKS.md (the TVM table, the
#: training recipes: written by their own benchmarks) are kept after them.
OWN_SECTIONS = ("Machine", "Targets", "Ratios", "Models", "The compiler's own time", "Compile-time scaling")


def other_sections(path: Path) -> str:
    """The sections of an existing report that other benchmarks wrote, in their order."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    sections = re.split(r"(?m)^(?=## )", text)[1:]
    return "".join(sec for sec in sections if not sec[3:].startswith(OWN_SECTIONS)).strip()


def old_notes(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError:
        return ""
    m = re.search(re.escape(NOTES_BEGIN) + r"\n(.*?)\n" + re.escape(NOTES_END), text, re.S)
    return m.group(1) if m and m.group(1).strip() != "_(no notes yet)_" else ""


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models, few calls, torch.compile at batch 1 only")
    ap.add_argument("--out", type=Path, help="write the report here (default: BENCHMARKS.md unless --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--specs", help="comma-separated zoo specs to time against references (default: all)")
    ap.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the compile-time scaling")
    ap.add_argument("--quiet-wait", type=float, help="before timing each batch, wait up to this many seconds "
                    "for other processes to leave the CPUs (default: 30 in a full run, 0 with --quick)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    out = args.out if args.out is not None else (None if args.quick else ROOT / "BENCHMARKS.md")
    batches = tuple(int(b) for b in args.batches.split(","))
    compile_batches = () if args.no_compile else ((batches[0],) if args.quick else batches)
    rounds, seconds = (6, 0.4) if args.quick else (30, 6.0)
    repeats = 1 if args.quick else 3
    targets = (100, 1000) if args.quick else (1000, 3000, 10000)
    wanted = args.specs.split(",") if args.specs else None
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 30.0)

    # full runs: a fresh inductor cache, so the first compiled call measures a cold torch.compile
    cache = None
    if not args.quick and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        cache = tempfile.TemporaryDirectory(prefix="specc-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    if compile_batches:  # the one-off start-up of the inductor toolchain, paid by neither variant
        torch.compile(lambda t: torch.sin(t) + 1)(torch.ones(4))
        torch._dynamo.reset()
    info = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    t_start = time.perf_counter()
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="specc-bench-") as d:
        tmp = Path(d)
        zoo = sorted(SPECS.glob("*.yaml"))
        print(f"\n== models: {', '.join(VARIANTS)}; batches {batches}; torch.compile at {compile_batches or 'none'}")
        for spec in zoo:
            case = CASES.get(spec.stem)
            if case is None or (wanted and spec.stem not in wanted):
                continue
            overrides = case.quick_overrides if args.quick else case.overrides
            try:
                results.append(bench_case(case, overrides, batches, rounds=rounds, seconds=seconds,
                                          compile_batches=compile_batches, tmp=tmp, quiet_wait=quiet_wait))
            except Exception as e:  # noqa: BLE001 - one broken spec must not hide the others
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                print(f"  {spec.stem}: FAILED {msg}")
                results.append(CaseResult(case, {}, [], (0, 0), error=msg))
        no_ref = [s.stem for s in zoo if s.stem not in CASES]
        if no_ref:
            print(f"  zoo specs without a hand-written reference (compile times only): {', '.join(no_ref)}")

        print("\n== the compiler's own time per zoo spec")
        specs = []
        for spec in zoo:
            case = CASES.get(spec.stem)
            overrides = (case.quick_overrides if args.quick else case.overrides) if case else {}
            specs.append(spec_times(spec, overrides, repeats, tmp))
        print(text_table(spec_table(specs)))

        scale: list[ScaleRow] = []
        if not args.no_scaling:
            print("\n== compile-time scaling")
            scale = scaling(targets, repeats, tmp)
    if cache is not None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        cache.cleanup()
    info["load average at end"] = loadavg()
    info["benchmark wall time"] = f"{time.perf_counter() - t_start:.0f} s"

    print("\n== all variants\n" + text_table(model_table(results)))
    print("\n== ratios vs the eager reference\n" + text_table(ratio_table(results)))
    if scale:
        print("\n== compile-time scaling\n" + text_table(scale_table(scale)))
    print("\n== targets")
    for v in verdicts(results, scale):
        print(f"  {v.target:52} {v.spec:22} {v.value:14} {v.met}")
    print(f"\nload average at end {info['load average at end']}; wall time {info['benchmark wall time']}")
    if out is not None:
        settings = (f"{'--quick' if args.quick else 'full run'}; {args.threads} torch threads; batches {batches}; "
                    f"torch.compile at {compile_batches or 'none'}; {rounds} interleaved rounds, about "
                    f"{seconds:g} s of calls per variant; up to {quiet_wait:g} s waited before each batch for other "
                    f"processes to leave the CPUs; tolerance {TOL:g} x max(1, max|ref|)")
        report = markdown(info, results, specs, scale, settings, old_notes(Path(out)))
        others = other_sections(Path(out))
        Path(out).write_text(report + ("\n" + others + "\n" if others else ""))
        print(f"wrote {out}")
    mismatched = any(not v.ok for cr in results for br in cr.batches for v in br.variants.values() if not v.error)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
