"""specc's CPU schedules (backends/tvm/schedules.py, rowops.py): every heavy kernel of the zoo is
scheduled by a rule, and the scheduled kernels compute what torch computes.

* Whole models: each zoo spec at sizes that exercise the schedules' edge cases (row counts that
  are not a multiple of the register tile, output widths that are not a multiple of the vector
  width or narrower than it, symbolic attention lengths below, at and above a vector), ONE library
  per spec run at two batch sizes (and lengths), against the PyTorch backend's module in float64.
  Tolerance as in test_tvm_equivalence: max |tvm - oracle| <= 1e-4 * max(1, max |oracle|).
* Kernels: the Matmul rule on single kernels (static and symbolic rows, every padding case,
  batched, B read in place or packed), against numpy in float64 (tolerance 1e-5 relative to the
  largest |value|); the row kernels (softmax with -inf entries, layer_norm, rms_norm) over ragged
  row lengths; the fast exp/erf/tanh against float64 (relative error <= 1e-6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax, te, tirx, topi  # noqa: E402

import specc  # noqa: E402
from specc.backends.pytorch.weights import init_weights  # noqa: E402
from specc.backends.tvm import rowops, schedules  # noqa: E402
from specc.backends.tvm.build import FUNC, compile_graph, make_target, pre_schedule_passes  # noqa: E402
from specc.backends.tvm.lowering import to_relax  # noqa: E402

from test_tvm_equivalence import REPO, assert_close, oracle_of, run_oracle, torch_model  # noqa: E402

TARGET = make_target("llvm")
LANES = schedules.vector_lanes(TARGET)

#: name -> (spec, overrides, runs of one library)
CASES = {
    # head width 65 (not a multiple of the vector), T from 1 to above 2 vectors, d_model 48
    "gpt": (REPO / "specs/gpt.yaml", dict(d_model=48, heads=3, layers=2, block_size=40),
            [dict(B=1, T=37), dict(B=3, T=16), dict(B=2, T=1)]),
    # 7 variates (rows per batch: 7), horizon 24 (1.5 vectors on AVX-512), d_model 64
    "itransformer": (REPO / "specs/itransformer.yaml", dict(d_model=64, heads=4, layers=1),
                     [dict(B=1), dict(B=5)]),
    # 5 classes (narrower than a vector); the LSTM scan is hand-written and left alone
    "lstm_classifier": (REPO / "specs/lstm_classifier.yaml", dict(vocab=50, d=24, hidden=20, layers=1),
                        [dict(B=1, T=9), dict(B=6, T=3)]),
}


def fused_kernels(graph) -> tvm.IRModule:
    mod, _ = to_relax(graph, "llvm", FUNC)
    with TARGET:
        return tvm.transform.Sequential(pre_schedule_passes(TARGET))(mod)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_heavy_kernel_is_scheduled(name):
    """Matmul takes every kernel with a matmul in it; nothing with a reduction is left to the
    unscheduled legalised loops (the row kernels come pre-scheduled)."""
    path, overrides, _ = CASES[name]
    mod = fused_kernels(specc.compile(path, **overrides))
    apply = schedules.ApplyCPUSchedules(TARGET)
    with TARGET:
        out = apply(mod)
    unscheduled = []
    for gv, func in out.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if "matmul" in gv.name_hint or "linear" in gv.name_hint:
            assert apply.applied.get(gv.name_hint) == "Matmul", (gv.name_hint, apply.applied.get(gv.name_hint))
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
            continue
        try:
            if relax.analysis.has_reshape_pattern(func):
                continue  # becomes a view (RewriteDataflowReshape)
        except Exception:  # noqa: BLE001 - hand-written TIR without blocks: the LSTM scan
            continue
        unscheduled.append(gv.name_hint)
    assert not unscheduled, unscheduled
    assert "Matmul" in apply.applied.values()


@pytest.mark.parametrize("name", sorted(CASES))
def test_scheduled_model_matches_torch(name, perturb):
    path, overrides, runs = CASES[name]
    graph = specc.compile(path, **overrides)
    weights = perturb(init_weights(graph))
    runner = compile_graph(graph, weights=weights)  # schedule="specc", the default; one library
    model = torch_model(path, overrides, weights)
    oracle = oracle_of(model)
    for seed, dims in enumerate(runs):
        inputs = model.example_inputs(seed=seed, **dims)
        assert_close(runner(*inputs), run_oracle(oracle, inputs), f"{name} at {dims}")


# ---------------------------------------------------------------------------------------------
# single kernels
# ---------------------------------------------------------------------------------------------

def _i64(v):
    return tirx.IntImm("int64", v) if isinstance(v, int) else v


def _build(func):
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)


def _schedule(func, rule):
    sch = rule.apply(func, TARGET, False)
    assert sch is not None, f"{type(rule).__name__} did not apply"
    return sch.mod["main"]


@pytest.mark.parametrize("m, k, n, b_layout", [
    (None, 40, 64, "kn"),   # symbolic rows, N a multiple of 4 vectors, B contiguous along N
    (None, 24, 65, "kn"),   # N not a multiple of the vector: padded, B packed per column tile
    (None, 16, 5, "kn"),    # N narrower than a vector
    (7, 33, 48, "kn"),      # static rows below the register tile, N = 3 vectors (padded to 4)
    (None, 32, 40, "nk"),   # B stored [N, K] (not contiguous along N): packed as [K, NR]
    (None, 512, 512, "kn"),  # rows outer, B (1 MiB, rows of 2 KiB) packed into panels once per call
    (520, 64, 512, "kn"),    # static rows >= 512: rows outer with B packed although K is small
    (None, 64, 600, "kn"),   # long B rows, small K, rows unknown: columns outer
    (None, 600, 600, "kn"),  # B over 1 MiB: columns outer
])
def test_matmul_rule_against_numpy(m, k, n, b_layout):
    M = tirx.Var("M", "int64") if m is None else _i64(m)
    A = te.placeholder((M, _i64(k)), name="A")
    Bw = te.placeholder((_i64(k), _i64(n)) if b_layout == "kn" else (_i64(n), _i64(k)), name="B")
    bias = te.placeholder((_i64(n),), name="bias")
    r = te.reduce_axis((_i64(0), _i64(k)), "r")
    at = (lambda kk, j: Bw[kk, j]) if b_layout == "kn" else (lambda kk, j: Bw[j, kk])
    C = te.compute((M, _i64(n)), lambda i, j: te.sum(A[i, r] * at(r, j), axis=r), name="C")
    D = te.compute((M, _i64(n)), lambda i, j: C[i, j] * 0.5 + bias[j], name="D")  # a fused epilogue
    lib = _build(_schedule(te.create_prim_func([A, Bw, bias, D]), schedules.Matmul()))
    rng = np.random.default_rng(0)
    for rows in ([m] if m is not None else [1, 5, 6, 13, 64]):
        a = rng.standard_normal((rows, k)).astype("float32")
        b = rng.standard_normal((k, n) if b_layout == "kn" else (n, k)).astype("float32")
        c = rng.standard_normal(n).astype("float32")
        d = tvm.runtime.tensor(np.zeros((rows, n), "float32"))
        lib["main"](*(tvm.runtime.tensor(x) for x in (a, b, c)), d)
        bt = b.astype(float) if b_layout == "kn" else b.astype(float).T
        want = a.astype(float) @ bt * 0.5 + c
        assert np.abs(d.numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), (rows, m, k, n, b_layout)


def test_matmul_loop_order_choice():
    """matmul_order: rows outer for one matmul whose B fits in L2; B in place when its rows are short and
    contiguous, packed when long rows meet a large K or known large I; columns outer otherwise."""
    order = schedules.matmul_order
    assert order(1, None, 256, 1024, 4, 64, False, True) == (True, True)    # gpt's MLP down
    assert order(1, None, 256, 256, 4, 64, False, True) == (True, True)     # attention output
    assert order(1, None, 1024, 256, 4, 64, False, True) == (False, False)  # MLP up, rows unknown
    assert order(1, 1024, 1024, 256, 4, 64, False, True) == (True, False)   # ... at 1024 rows: packed
    assert order(1, None, 256, 1024, 4, 64, False, False) == (True, False)  # B not contiguous: packed
    assert order(1, None, 80, 24, 4, 16, True, True) == (False, False)      # J padded, small K and I unknown
    assert order(1, 1024, 80, 24, 4, 16, True, True) == (True, False)       # ... at 1024 rows: packed
    assert order(1, None, 256, 2048, 4, 64, False, True) == (False, False)  # B of 2 MiB
    assert order(8, None, 256, 64, 4, 64, False, True) == (False, False)    # batched: columns outer
    assert order(1, None, 64, 256, 4, 64, False, True) == (False, False)    # one column tile
    assert order(1, None, None, 256, 4, 64, True, True) == (False, False)   # symbolic J


@pytest.mark.parametrize("cores", [2, 64])
def test_wide_contiguous_weight_packed_when_column_tiles_go_round(cores, monkeypatch):
    """Columns outer (B over ROWS_OUTER_MAX_B_BYTES), B [K, N] contiguous along N: packed per column
    tile into [K, NR] when the column tiles are at least the cores (N = 256 at NR = 4 vectors: 4 or
    more tiles), read in place otherwise; both right."""
    monkeypatch.setattr(schedules, "ROWS_OUTER_MAX_B_BYTES", 0)
    target = make_target({"kind": "llvm", "num-cores": cores})
    k, n = 48, 16 * LANES
    func = _scheduled_kn_matmul(k, n, target)
    tiles = n // schedules.matmul_config(None, n, LANES)[0].nr
    assert ("B_reindex = T.sblock_alloc_buffer" in func.script()) == (tiles >= cores)  # the packed panel
    _check_kn_matmul(func, k, n, target, (1, 7, 64))


def _scheduled_kn_matmul(k: int, n: int, target):
    """The Matmul rule's schedule of C[M, n] = A[M, k] @ B[k, n], M symbolic (B contiguous along n)."""
    M = tirx.Var("M", "int64")
    A = te.placeholder((M, _i64(k)), name="A")
    Bw = te.placeholder((_i64(k), _i64(n)), name="B")
    r = te.reduce_axis((_i64(0), _i64(k)), "r")
    C = te.compute((M, _i64(n)), lambda i, j: te.sum(A[i, r] * Bw[r, j], axis=r), name="C")
    sch = schedules.Matmul().apply(te.create_prim_func([A, Bw, C]), target, False)
    assert sch is not None
    return sch.mod["main"]


def _check_kn_matmul(func, k: int, n: int, target, row_counts) -> None:
    """`func` (from _scheduled_kn_matmul) against float64 numpy at each row count (tolerance 1e-5 relative)."""
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    rng = np.random.default_rng(0)
    for rows in row_counts:
        a = rng.standard_normal((rows, k)).astype("float32")
        b = rng.standard_normal((k, n)).astype("float32")
        d = tvm.runtime.tensor(np.zeros((rows, n), "float32"))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), d)
        want = a.astype(float) @ b.astype(float)
        assert np.abs(d.numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), (rows, target)


def test_column_chunks():
    assert [schedules.column_chunks(8, c) for c in (1, 2, 3, 4, 16)] == [1, 2, 2, 4, 8]
    assert [schedules.column_chunks(6, c) for c in (4, 5)] == [3, 3]
    assert schedules.column_chunks(7, 4) == 1 and schedules.column_chunks(1, 8) == 1


@pytest.mark.parametrize("cores", [1, 2, 3, 4])
def test_rows_outer_matmul_runs_one_row_on_every_core(cores):
    """Rows outer (B of 1 MiB), rows unknown: the column tiles are cut into chunks that run beside the row
    tiles, so that one row (batch 1) is still a parallel task per core (8 column tiles: 1, 2, 2, 4 chunks)."""
    target = make_target({"kind": "llvm", "num-cores": cores})
    k, n = 512, 512
    func = _scheduled_kn_matmul(k, n, target)
    cfg, _ = schedules.matmul_config(None, n, LANES)
    assert schedules.matmul_order(1, None, n, k, 4, cfg.nr, False, True)[0]  # the rows-outer order
    chunks = schedules.column_chunks(n // cfg.nr, cores)
    tasks = [line for line in func.script().splitlines() if "T.parallel((M" in line]
    assert len(tasks) == 1, tasks
    assert tasks[0].rstrip().endswith(f"// T.int64({cfg.mr}) * T.int64({chunks})):" if chunks > 1
                                      else f"// T.int64({cfg.mr})):"), tasks
    _check_kn_matmul(func, k, n, target, (1, 7))


def test_batched_matmul_rule_with_symbolic_length():
    """Attention scores: [S, T, 64] x [S, 64, T] with T symbolic (padded to the tile in both I and J)."""
    S, T = tirx.Var("S", "int64"), tirx.Var("T", "int64")
    q = te.placeholder((S, T, _i64(16)), name="q")
    kt = te.placeholder((S, _i64(16), T), name="kt")
    r = te.reduce_axis((_i64(0), _i64(16)), "r")
    att = te.compute((S, T, T), lambda s, i, j: te.sum(q[s, i, r] * kt[s, r, j], axis=r), name="att")
    out = te.compute((S, T, T), lambda s, i, j: tvm.tirx.Select(j <= i, att[s, i, j] * 0.25,
                                                                 tirx.const(-1e9, "float32")), name="mask")
    lib = _build(_schedule(te.create_prim_func([q, kt, out]), schedules.Matmul()))
    rng = np.random.default_rng(1)
    for s, t in ((1, 1), (2, 17), (3, 40)):
        a = rng.standard_normal((s, t, 16)).astype("float32")
        b = rng.standard_normal((s, 16, t)).astype("float32")
        o = tvm.runtime.tensor(np.zeros((s, t, t), "float32"))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), o)
        want = np.einsum("sik,skj->sij", a.astype(float), b.astype(float)) * 0.25
        keep = np.broadcast_to(np.arange(t)[None, None, :] <= np.arange(t)[None, :, None], want.shape)
        got = o.numpy()
        assert (got[~keep] == np.float32(-1e9)).all()
        assert np.abs(got[keep] - want[keep]).max() <= 1e-5 * max(1.0, np.abs(want[keep]).max()), (s, t)


def test_matmul_rule_with_symbolic_rows_that_divide_the_tile():
    """x [B, 3, 16, 32] @ W [32, 64]: 48 * B rows, a multiple of the row tile (6), so nothing is padded;
    each tile's rows wrap from one row of x into the next, and the copy of x per tile must cover them
    (found on timellm, whose patches are [B * variates, P, d])."""
    B = tirx.Var("B", "int64")
    x = te.placeholder((B, _i64(3), _i64(16), _i64(32)), name="x")
    w = te.placeholder((_i64(32), _i64(64)), name="w")
    r = te.reduce_axis((_i64(0), _i64(32)), "r")
    out = te.compute((B, _i64(3), _i64(16), _i64(64)),
                     lambda b, v, i, j: te.sum(x[b, v, i, r] * w[r, j], axis=r), name="y")
    lib = _build(_schedule(te.create_prim_func([x, w, out]), schedules.Matmul()))
    rng = np.random.default_rng(2)
    for b in (1, 2, 5):
        a = rng.standard_normal((b, 3, 16, 32)).astype("float32")
        m = rng.standard_normal((32, 64)).astype("float32")
        o = tvm.runtime.tensor(np.full((b, 3, 16, 64), np.nan, "float32"))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(m), o)
        want = a.astype(float) @ m.astype(float)
        assert np.abs(o.numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), b


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40])
def test_row_kernels_over_ragged_rows(length):
    B = tirx.Var("B", "int64")
    L = tirx.Var("L", "int64")
    rng = np.random.default_rng(length)

    def build(fn, shapes):
        args = [te.placeholder(s, "float32", name=f"a{i}") for i, s in enumerate(shapes)]
        return _build(rowops.schedule_row_kernel(te.create_prim_func(args + [fn(*args)]), LANES))

    sm = build(lambda a: rowops.softmax_te(a, LANES), [(B, _i64(3), L)])
    x = (rng.standard_normal((2, 3, length)) * 4).astype("float32")
    if length > 1:
        x[:, :, -1] = -np.inf  # masked positions (causal attention)
    y = tvm.runtime.tensor(np.zeros_like(x))
    sm["main"](tvm.runtime.tensor(x), y)
    want = torch.softmax(torch.from_numpy(x).double(), -1).numpy()
    assert np.abs(y.numpy() - want).max() <= 1e-6

    d = length
    ln = build(lambda a, g, b: rowops.layer_norm_te(a, g, b, 1e-5, LANES, True, True), [(B, _i64(d)), (_i64(d),), (_i64(d),)])
    rms = build(lambda a, g: rowops.rms_norm_te(a, g, 1e-6, LANES), [(B, _i64(d)), (_i64(d),)])
    x = (rng.standard_normal((5, d)) * 3 + 2).astype("float32")
    g, b = rng.standard_normal(d).astype("float32"), rng.standard_normal(d).astype("float32")
    y = tvm.runtime.tensor(np.zeros_like(x))
    ln["main"](*(tvm.runtime.tensor(v) for v in (x, g, b)), y)
    xd = torch.from_numpy(x).double()
    want = torch.nn.functional.layer_norm(xd, (d,), torch.from_numpy(g).double(), torch.from_numpy(b).double()).numpy()
    assert np.abs(y.numpy() - want).max() <= 1e-4 * max(1, np.abs(want).max())
    rms["main"](*(tvm.runtime.tensor(v) for v in (x, g)), y)
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.from_numpy(g).double()).numpy()
    assert np.abs(y.numpy() - want).max() <= 1e-4 * max(1, np.abs(want).max())


def test_fast_math_accuracy():
    """topi's fast exp/erf/tanh, which CPUFastMath substitutes, against float64."""
    x = np.concatenate([np.linspace(-80, 80, 4001), np.linspace(-6, 6, 4001)]).astype("float32")
    refs = {"fast_exp": np.exp, "fast_erf": np.vectorize(math.erf), "fast_tanh": np.tanh}
    for name, ref in refs.items():
        X = te.placeholder((_i64(x.size),), "float32")
        lib = _build(te.create_prim_func([X, getattr(topi, name)(X)]))
        y = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), y)
        want = ref(x.astype(float))
        rel = np.abs(y.numpy() - want) / np.maximum(np.abs(want), 1e-30)
        assert rel.max() <= 1e-6, (name, float(rel.max()), float(x[rel.argmax()]))


def test_cpu_targets_name_the_host_cpu():
    """"llvm" and {"kind": "llvm", "mcpu": "native"} (which TVM would silently take for a generic x86-64,
    without AVX-512) both name the CPU as LLVM detects it, with the physical core count MetaSchedule needs."""
    from specc.backends.tvm.build import host_cpu

    for spec in ("llvm", {"kind": "llvm", "mcpu": "native"}):
        tgt = make_target(spec)
        assert str(tgt.attrs["mcpu"]) == host_cpu() != "generic"
        assert int(tgt.attrs["num-cores"]) >= 1
    assert str(make_target({"kind": "llvm", "mcpu": "skylake-avx512"}).attrs["mcpu"]) == "skylake-avx512"


@pytest.mark.parametrize("name, dims", [("gpt", {"B": 2, "T": 16}), ("itransformer", {"B": 8}),
                                        ("lstm_classifier", {"B": 3, "T": 5})])
def test_static_kernels_match_the_unscheduled_ones(name, dims):
    """The static-shape kernels of a tuned build (the tuning database's specialisations), each scheduled
    by the rules and run against the same kernel unscheduled, on random inputs. With static sizes the
    rows fused from several axes (B x variates) need not be padded: regression test for a tile that
    computed its operand rows through a bounding box of the unfused axes."""
    from specc.backends.tvm.tuning import tuning_tasks

    path, overrides, _ = CASES[name]
    rng = np.random.default_rng(0)
    checked = 0
    for task in tuning_tasks(specc.compile(path, **overrides), TARGET, [dims]):
        func = task.dispatched[0]["main"]
        sch = None
        for rule in schedules.default_rules():
            sch = rule.apply(func, TARGET, False)
            if sch is not None:
                break
        if sch is None:
            continue
        args = []
        for p in func.params:
            shape, dtype = [int(d) for d in p.ty.shape], str(p.ty.dtype)
            args.append(rng.integers(0, 4, size=shape).astype(dtype) if "int" in dtype
                        else np.abs(rng.standard_normal(shape)).astype(dtype))
        outs = []
        for f in (func, sch.mod["main"]):
            tensors = [tvm.runtime.tensor(a.copy()) for a in args]
            _build(f)["main"](*tensors)
            outs.append(tensors[-1].numpy().astype(float))
        assert np.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * max(1.0, np.abs(outs[0]).max())), task.task_name
        checked += 1
    assert checked >= 3
