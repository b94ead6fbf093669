"""CPU schedules for the kernels specc's Relax lowering produces (after FuseOps/FuseTIR), dlight-style.

Each rule is a `dlight.ScheduleRule`: given a fused PrimFunc it recognises by its structure (never by
its name), it returns a Schedule, or None when it does not apply. `ApplyCPUSchedules(target)` runs
them over every unscheduled PrimFunc of a module, first rule that applies wins:

* `Matmul`: one reduction block of the form C[S, I, J] += A[S, I, K] * B[S, J, K] (any layouts;
  S = batch axes, e.g. batch x heads in attention), plus elementwise producers and consumers fused
  around it (bias, activation, residual, the attention scale and causal mask). Covers linear/dense,
  matmul, batched matmul (attention scores and attention x values).
  The block is normalised to [S, I, J, K] (dlight's reindex), padded so that the tiles divide
  the iteration space (`pad_einsum`: dynamic batch and length are padded per tile, never per call),
  and tiled for registers: an MR x NR output tile (NR = 1..4 vector registers, MR rows so that
  MR * NR / lanes accumulators fit in the 32 AVX-512 registers) is accumulated in a local buffer
  over the whole K loop (unrolled by 2), the inner loops unrolled (MR) and vectorised (NR, float32 lanes as the
  target's vector width gives: 16 on AVX-512, 8 on AVX2); the A rows of a tile are packed
  (padded) per tile; B (weights are stored transposed by the lowering, [K, J], once, at bind
  time) packed once per column tile into a contiguous [K, NR] panel with the row tiles inside,
  as it must be when J is padded or B is contiguous along K (attention's keys); a B contiguous
  along J is read in place only when there are fewer column tiles than cores (the row tiles then
  are parallel tasks too). Packed, a wide weight's panel rows no longer sit J floats apart
  (4 KiB for J = 1024: every row in the same L1 sets): gpt's MLP matmuls ran 7-15% faster. The
  epilogue (bias, gelu, residual, scale and mask...) runs on the tile as it is written back.
  Outer loops: batch, column tiles (, row tiles), fused and parallel (the TVM runtime's threads);
  for a single matmul whose B fits in L2, row tiles outer instead (`matmul_order`: A's rows stay in
  L1 while the column tiles stream B from L2, B read in place or packed once per call into
  [J / NR, K, NR] panels): gpt's MLP-down and attention-output layers ran 10-15% faster (up
  to 27% alone). A convolution (lowering's implicit-GEMM kernel) is this matmul with B a window
  gather of the input (a block marked GATHER_MARK): the gather is computed inside B's packing,
  never whole, and the packing's vectors are cut to an output row when rows are narrower than a
  vector (so that each is one contiguous load).
* `RowReduction`: reductions that the row kernels (rowops.py: softmax, layer_norm, rms_norm over
  the last axis, substituted before legalisation) do not cover, e.g. mean/sum: dlight's CPU
  Reduction rule (rows in parallel, blocks computed at the row, injective inner loops vectorised).
* `Injective`: everything elementwise or data movement (transpose, take, concat, arange, casts):
  producers inlined into the last block, its innermost static axis vectorised, the outer axes fused
  and parallel.

`CPUFastMath` (a Relax pass, before legalisation) swaps exp/erf/tanh/sigmoid/gelu/silu for TVM's
polynomial fast versions, which vectorise (LLVM calls scalar libm for the others).

Functions already marked `tirx.is_scheduled` (the LSTM recurrence kernel, MetaSchedule-tuned
kernels) and reshape-only functions (which Relax later turns into views) are left alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

_IS_SCHEDULED = "tirx.is_scheduled"
#: SPECC_SCHEDULE_DEBUG=1: a rule that fails half-way raises instead of leaving the function to the next rule
_DEBUG = os.environ.get("SPECC_SCHEDULE_DEBUG") == "1"
#: Rows outer (see Matmul): when B takes at most this many bytes (it then stays in each core's L2)
ROWS_OUTER_MAX_B_BYTES = 1 << 20
#: ... and B is read in place when its rows are shorter than this (longer: every row of a [K, NR]
#: column panel in the same few L1 sets, so B is packed into panels first)
ROWS_OUTER_INPLACE_ROW_BYTES = 2048


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """float lanes of one vector register of the target's CPU (16 f32 on AVX-512, 8 on AVX2)."""
    from tvm.target.codegen import llvm_get_vector_width

    try:
        bits = int(llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - an unknown CPU: assume SSE
        bits = 128
    if bits <= 0:
        bits = 128
    return max(bits // dtype_bits, 1)


def _int(e: Any) -> int | None:
    return int(e.value) if isinstance(e, tirx.IntImm) else (e if isinstance(e, int) else None)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    return _int(sch.get(loop).extent)


def _blocks(sch: s_tir.Schedule) -> list:
    from tvm.s_tir.dlight.analysis import get_root_block

    return list(sch.get_child_blocks(get_root_block(sch)))


def _iter_types(sch: s_tir.Schedule, block) -> set:
    return {iv.iter_type for iv in sch.get(block).iter_vars}


def _is_spatial(sch: s_tir.Schedule, block) -> bool:
    return _iter_types(sch, block) == {tirx.IterVar.DataPar} or not sch.get(block).iter_vars


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return _iter_types(sch, block) == {tirx.IterVar.DataPar, tirx.IterVar.CommReduce}


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # noqa: BLE001 - a primitive refusing is an answer, not an error
        return False


def _innermost_var(index: Any) -> Any:
    """The innermost iteration variable of a (fused) index expression `... * n + v`, else None."""
    if isinstance(index, tirx.Var):
        return index
    if isinstance(index, tirx.Add) and isinstance(index.b, tirx.Var):
        return index.b
    return None


def _contiguous_along(reindex_block: Any, axis: int) -> bool:
    """Whether the buffer a reindex block copies is contiguous (last index) along its written `axis`."""
    read = reindex_block.reads[0].region
    write = reindex_block.writes[0].region
    last = read[-1].min if len(read) else None
    inner = _innermost_var(write[axis].min)
    return isinstance(last, tirx.Var) and inner is not None and last.same_as(inner)


#: Block annotation of a convolution's window gather (lowering's implicit-GEMM conv kernel): the
#: Matmul rule leaves it out of the matmul's own reads and computes it inside B's panel packing
GATHER_MARK = "specc.gather"


#: Block annotation of a matmul-like block whose first N spatial axes are batch axes although its first
#: operand (the weights) does not read them: lowering's convolution over symbolic image sizes, whose
#: batch would otherwise join the output positions in one fused axis and be recovered by a division
#: (by a runtime size) at every index of the gather and the write-back.
BATCH_MARK = "specc.batch"


def index_maps(block) -> tuple | None:
    """dlight's get_index_map for C[S, I, J] += A[S, I, K] * B[S, J, K] (matmul, A, B, C maps), except that
    the first BATCH_MARK spatial axes of a block so marked are S (batch) axes where A does not read them."""
    from tvm.s_tir.dlight.gpu.matmul import (IterKind, IterTrait, detect_iter_traits, get_index_map,
                                             make_iter_fusion_index_map)

    batch = int(block.annotations.get(BATCH_MARK, 0)) if BATCH_MARK in block.annotations else 0
    if not batch:
        return get_index_map(block)
    traits = detect_iter_traits(block)
    if traits is None:
        return None
    a_traits, b_traits, c_traits, block_traits = traits
    kinds = [t.kind for t in block_traits]
    if kinds[:batch] != [IterKind.kIter_J] * batch:
        return get_index_map(block)
    marked = {id(t) for t in block_traits[:batch]}

    def relabel(ts):
        return [IterTrait(IterKind.kIter_S, t.extent) if id(t) in marked else t for t in ts]

    a_traits, b_traits, c_traits, block_traits = map(relabel, (a_traits, b_traits, c_traits, block_traits))
    return (make_iter_fusion_index_map(block_traits, [IterKind.kIter_S, IterKind.kIter_I, IterKind.kIter_J,
                                                      IterKind.kIter_K]),
            make_iter_fusion_index_map(a_traits, [IterKind.kIter_S, IterKind.kIter_I, IterKind.kIter_K]),
            make_iter_fusion_index_map(b_traits, [IterKind.kIter_S, IterKind.kIter_J, IterKind.kIter_K]),
            make_iter_fusion_index_map(c_traits, [IterKind.kIter_S, IterKind.kIter_I, IterKind.kIter_J]))


def _is_gather(sch: s_tir.Schedule, block) -> bool:
    return GATHER_MARK in sch.get(block).annotations


def _inline_producers(sch: s_tir.Schedule, block, keep_gathers: bool = False) -> None:
    """compute_inline every (transitive) spatial producer of `block` that can be inlined (but a window
    gather, with keep_gathers)."""
    changed = True
    while changed:
        changed = False
        for p in sch.get_producers(block):
            if keep_gathers and _is_gather(sch, p):
                continue
            if _is_spatial(sch, p) and _try(sch.compute_inline, p):
                changed = True
                break
            # a producer that cannot be inlined keeps its own producers: inline those into it
            for pp in sch.get_producers(p):
                if _is_spatial(sch, pp) and _try(sch.compute_inline, pp):
                    changed = True
                    break
            if changed:
                break


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int, max_vector: int | None = None) -> None:
    """Vectorise the innermost loop of `block` when its extent is static (split to a multiple of lanes)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    n = _extent(sch, inner)
    if n is None or n < 2:
        return
    width = max_vector or lanes
    if n <= width:
        sch.vectorize(inner)
        return
    for w in (width, lanes):
        if n % w == 0:
            _, v = sch.split(inner, [None, w])
            sch.vectorize(v)
            return


def _parallel_outer(sch: s_tir.Schedule, loops: list, min_tasks: int = 1) -> Any | None:
    """Fuse `loops` (outer spatial loops) and mark the fused loop parallel; the fused loop."""
    if not loops:
        return None
    fused = loops[0]
    if len(loops) > 1:
        try:
            fused = sch.fuse(*loops)
        except Exception:  # noqa: BLE001 - symbolic extents the iterator analysis cannot fuse, e.g.
            fused = loops[0]  # (T + 3) * 2 split again by a reshape: the outermost loop alone, then
    n = _extent(sch, fused)
    if n is not None and n < min_tasks:
        return fused
    sch.parallel(fused)
    return fused


# ---------------------------------------------------------------------------------------------
# matmul (dense, batched)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatmulConfig:
    """A register tile: MR rows (unrolled) x NR columns (vectorised)."""

    mr: int
    nr: int


def matmul_config(i_extent: int | None, j_extent: int | None, lanes: int, registers: int = 32) -> tuple[MatmulConfig, bool]:
    """The tile for an I x J output, and whether J must be padded to a multiple of NR.

    NR: 4, 2 or 1 vector registers (power-of-two widths: LLVM splits a 3-register vector badly),
    the widest that leaves the least padding; a narrow output (classes, horizon) gets one vector
    rounded up to a power of two. MR: rows so that MR * NR / lanes accumulators take at most 3/4
    of the vector registers, at most 8, at most I when I is static.
    """
    budget = registers * 3 // 4
    if j_extent is None:
        nr = 2 * lanes
    elif j_extent < lanes:
        nr = 1 << max(j_extent - 1, 0).bit_length()
    else:
        best = None
        for v in (4, 2, 1):
            padded = -(-j_extent // (v * lanes)) * v * lanes
            if best is None or padded < best[0]:
                best = (padded, v * lanes)
        nr = best[1]
    pad_j = j_extent is None or j_extent % nr != 0
    nv = max(nr // lanes, 1)
    mr = max(1, min(8, budget // nv))
    if i_extent is not None:
        mr = max(1, min(mr, i_extent))
    return MatmulConfig(mr, nr), pad_j


def _cores(target: Target) -> int:
    """The target's core count (`num-cores`, which make_target sets), else this machine's CPUs."""
    n = target.attrs.get("num-cores") if target.attrs is not None else None
    return int(n) if n is not None and int(n) > 0 else (os.cpu_count() or 1)


def _column_tasks(s_extent: int | None, j_extent: int | None, nr: int) -> int:
    """Parallel tasks when the row tiles run inside each (batch, column tile); unknown sizes count as many."""
    if s_extent is None or j_extent is None:
        return 1 << 30
    return s_extent * -(-j_extent // nr)


def matmul_order(s_ext: int | None, i_ext: int | None, j_ext: int | None, k_ext: int | None, nbytes: int,
                 nr: int, pad_j: bool, b_contiguous_j: bool) -> tuple[bool, bool]:
    """(row tiles outer, B read in place) for C[S, I, J] += A[S, I, K] B[S, J, K]: rows outer only for
    a single matmul (S = 1) whose B fits in L2 (ROWS_OUTER_MAX_B_BYTES).

    Rows outer, a row tile's A rows (MR x K) stay in L1 while every column tile streams its B panel
    from L2; columns outer (the default) re-reads all of A, from L3 when A is larger than L2, once
    per column tile. Measured on 2 cores (AVX-512), [I, K] x [K, J] float32, GMAC/s, columns -> rows
    outer: K=1024, J=256 at I=1024: 156 -> 173 in place, 180 packed; at I=128: 137 -> 161 in place,
    117 packed; K=256, J=256: 134 -> 171 (I=1024), 125 -> 162 (I=128); K=256, J=1024: 160 -> 179
    packed (I=1024) but 147 -> 126 (I=128): a B with long rows must be packed (in place, a panel's
    rows alias in L1: ROWS_OUTER_INPLACE_ROW_BYTES), and packing 1 MB per call does not pay at small
    I. So: rows outer with B in place when its rows are short; packed only when K is large (the A
    re-reads are the cost) or I is known to be large (static shapes, as in tuned builds).
    """
    if s_ext != 1 or j_ext is None or k_ext is None or j_ext <= nr:
        return False, False
    if k_ext * j_ext * nbytes > ROWS_OUTER_MAX_B_BYTES:
        return False, False
    in_place = not pad_j and b_contiguous_j and j_ext * nbytes < ROWS_OUTER_INPLACE_ROW_BYTES
    if in_place or k_ext >= 512 or (i_ext is not None and i_ext >= 512):
        return True, in_place
    return False, False


def column_chunks(tiles: int, cores: int) -> int:
    """How many parallel chunks `tiles` column tiles go in: the most, up to `cores`, that divide them
    evenly (no chunk runs a predicated, partial tile loop)."""
    return max(c for c in range(1, min(tiles, cores) + 1) if tiles % c == 0)


class _CpuRule(ScheduleRule):
    """A rule for the llvm (CPU) target."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def applies(self, func: tirx.PrimFunc, target: Target) -> bool:
        return isinstance(func, tirx.PrimFunc) and self.is_target_available(target)


def _schedule(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list] | None:
    """A schedule of `func` and its root's child blocks; None for hand-written TIR without a root block."""
    sch = s_tir.Schedule(func)
    try:
        return sch, _blocks(sch)
    except Exception:  # noqa: BLE001
        return None


class Matmul(_CpuRule):
    """C[S, I, J] += A[S, I, K] * B[S, J, K] with fused elementwise prologue/epilogue (see the module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.applies(func, target) or (started := _schedule(func)) is None:
            return None
        sch, blocks = started
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1 or not all(_is_spatial(sch, b) or b in reductions for b in blocks):
            return None
        main = reductions[0]
        stmt = sch.get(main)
        if index_maps(stmt) is None:
            return None
        dtype = str(stmt.writes[0].source.dtype)
        if dtype not in ("float32", "float64"):
            return None  # integer or half-precision matmuls: left to the next rule
        try:
            return self._schedule(sch, main, target)
        except Exception:  # noqa: BLE001 - a shape this rule did not foresee: let the next rule try
            if _DEBUG:
                raise
            return None

    def _schedule(self, sch: s_tir.Schedule, main, target: Target) -> s_tir.Schedule | None:
        # 1. Normalise to C[s, i, j] += A[s, i, k] * B[s, j, k] (reindex buffers: views, inlined below).
        # Side computations of the epilogue (e.g. the causal mask from two aranges) are inlined first.
        _inline_producers(sch, main, keep_gathers=True)
        for b in _blocks(sch):
            if not sch.get(b).same_as(sch.get(main)) and _is_spatial(sch, b) and sch.get_consumers(b) \
                    and not _is_gather(sch, b):
                _try(sch.compute_inline, b)
        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        matmul_map, a_map, b_map, c_map = index_maps(sch.get(main))
        sch.transform_layout(reindex_a, ("write", 0), a_map)
        sch.transform_layout(reindex_b, ("write", 0), b_map)
        sch.transform_layout(reindex_c, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)

        stmt = sch.get(main)
        s_ext, i_ext, j_ext, k_ext = (_int(iv.dom.extent) for iv in stmt.iter_vars)
        lanes = vector_lanes(target, stmt.writes[0].source.dtype.bits)
        cfg, pad_j = matmul_config(i_ext, j_ext, lanes)
        # B packed per column tile as [K, NR] (contiguous: the panel's rows do not alias in L1, as rows
        # of a wide weight do, at a stride of J floats) when that leaves a column tile for every core;
        # read in place only when contiguous along J and there are too few column tiles to go round.
        b_contiguous = _contiguous_along(sch.get(reindex_b), 1)
        # implicit GEMM: a convolution's window gather is computed inside B's packing, never in place
        gathers = [p for p in sch.get_producers(reindex_b) if _is_gather(sch, p)]
        gather_b = bool(gathers)
        # contiguous runs of the gather: an output row (the last spatial axis); a packing vector longer
        # than that would be assembled lane by lane, so the packing's vectors are cut to it
        run = _int(sch.get(gathers[0]).iter_vars[-1].dom.extent) if gathers else None
        gather_vector = run if run is not None and run < lanes and lanes % run == 0 else None
        pack_b = pad_j or not b_contiguous or gather_b or _column_tasks(s_ext, j_ext, cfg.nr) >= _cores(target)

        # 2. The epilogue: inline the chain after the matmul (reindex view, bias, activation, residual)
        # into one block, and iterate that block over the matmul's [s, i, j] space, so that it can run
        # on each tile as the tile is written back.
        self._inline_consumers(sch, main)
        consumers = sch.get_consumers(main)
        if len(consumers) != 1:
            return None
        out_blk = consumers[0]
        per_tile = _try(sch.transform_block_layout, out_blk, c_map) or self._is_sij(sch, out_blk, main)

        # 3. Pad I to MR (and J to NR when needed): full tiles only in the inner loops.
        pad_i = i_ext is None or i_ext % cfg.mr != 0
        if pad_i or pad_j:
            sch.pad_einsum(main, [1, cfg.mr if pad_i else 1, cfg.nr if pad_j else 1, 1])
            # the copy out of the padded buffer joins the epilogue block
            self._inline_consumers(sch, main)
            consumers = sch.get_consumers(main)
            if len(consumers) != 1:
                return None
            out_blk = consumers[0]
        # An operand that was not padded is still copied by its reindex block, which iterates over the
        # operand's own axes (e.g. [B, T, K]); computed per tile, TVM would bound a tile's fused rows
        # b*T+t by a box in (b, t) that covers other rows too. Make it iterate over the fused axes
        # ([S, I, K] / [S, J, K]) first, as the padded copies do.
        # pad_einsum adds no padded copy where it proves the extent divisible (e.g. symbolic rows 48 * B for
        # MR = 6): then the reindex block is still there, on the operand's axes, whatever pad_i says.
        if not _try(sch.transform_block_layout, reindex_a, a_map) and not pad_i:
            return None
        if pack_b and not _try(sch.transform_block_layout, reindex_b, b_map) and not pad_j:
            return None
        producers = {sch.get(p).writes[0].source.name: p for p in sch.get_producers(main)}
        a_blk = producers.get(self._read_buffer(sch, main, 0))
        b_blk = producers.get(self._read_buffer(sch, main, 1))

        # 4. The register tile: columns outer (a B panel stays in cache over the row tiles), rows inner.
        # When B must be packed (J padded, or B not contiguous along J), the panel [K, NR] is packed
        # once per column tile and the row tiles run inside it (parallel over batch x column tiles);
        # else every (batch, column, row) tile is a parallel task.
        s, i, j, k = sch.get_loops(main)
        i0, i1 = sch.split(i, [None, cfg.mr])
        j0, j1 = sch.split(j, [None, cfg.nr])
        rows_outer, b_in_place = matmul_order(s_ext, i_ext, j_ext, k_ext,
                                              stmt.writes[0].source.dtype.bits // 8, cfg.nr, pad_j,
                                              b_contiguous and not gather_b)
        if rows_outer:
            sch.reorder(s, i0, j0, k, i1, j1)
            # the column tiles in as many chunks as there are cores, each chunk a parallel task beside
            # the row tiles: a matmul of a few rows (batch 1) is otherwise one task, on one core. A
            # chunk packs the row tile's A again (MR x K, against MR x K x J/chunks multiply-adds).
            chunks = column_chunks(-(-j_ext // cfg.nr), _cores(target))
            if chunks > 1:
                jc, j0 = sch.split(j0, [chunks, None])
                outer = sch.fuse(s, i0, jc)
            else:
                outer = sch.fuse(s, i0)
            tile = j0
        else:
            sch.reorder(s, j0, i0, k, i1, j1)
            if pack_b:
                outer = sch.fuse(s, j0)
                tile = i0
            else:
                outer = tile = sch.fuse(s, j0, i0)
        if per_tile:
            sch.set_scope(main, 0, "local")  # MR x NR accumulators: registers after unrolling
            sch.reverse_compute_at(out_blk, tile, preserve_unit_loops=True)
            _vectorize_inner(sch, out_blk, lanes, max_vector=cfg.nr)
        else:
            # write back after all tiles (a layout the tile cannot map onto): its own parallel loop nest
            _vectorize_inner(sch, out_blk, lanes)
            loops = [l for l in sch.get_loops(out_blk) if sch.get(l).kind == tirx.ForKind.SERIAL]
            if loops:
                _parallel_outer(sch, loops[:-1] or loops)

        # 5. Producers: A packed per tile (its padded copy), B in place or packed per column tile as [K, NR].
        if rows_outer:
            if a_blk is not None:
                self._pack(sch, a_blk, outer, lanes)
            if b_blk is not None and not (b_in_place and _try(sch.compute_inline, b_blk)):
                self._pack_panels(sch, b_blk, cfg.nr, lanes, max_vector=gather_vector)
        else:
            if a_blk is not None:
                self._pack(sch, a_blk, tile, lanes)
            if b_blk is not None and not (not pack_b and _try(sch.compute_inline, b_blk)):
                self._pack(sch, b_blk, outer, lanes, transpose_last=True, max_vector=gather_vector)

        # 6. Inner loops: unroll MR, vectorise NR; the outer loop parallel; the init split off.
        sch.unroll(i1)
        sch.vectorize(j1)
        sch.parallel(outer)
        sch.decompose_reduction(main, k)
        # K unrolled by 2 when static and even: two steps of MR broadcasts, NR/lanes loads and
        # MR * NR/lanes FMAs per loop iteration (gpt's linear layers ran 2-5% faster)
        k_static = _extent(sch, k)
        if k_static is not None and k_static % 2 == 0 and k_static > 2:
            sch.unroll(sch.split(k, [None, 2])[1])
        return sch

    @staticmethod
    def _pack_panels(sch: s_tir.Schedule, block, nr: int, lanes: int, max_vector: int | None = None) -> None:
        """B packed once, before the tiles, as [s, J / NR, K, NR] panels (producers inlined)."""
        _inline_producers(sch, block)
        sch.transform_layout(block, ("write", 0), lambda s, j, k: (s, j // nr, k, j % nr))
        loops = sch.get_loops(block)
        sch.reorder(loops[-1], loops[-2])  # k outer, j inner: vector stores along j
        _vectorize_inner(sch, block, lanes, max_vector=max_vector)
        loops = [l for l in sch.get_loops(block) if sch.get(l).kind == tirx.ForKind.SERIAL]
        if len(loops) > 1:
            _parallel_outer(sch, loops[:-1])

    @staticmethod
    def _is_sij(sch: s_tir.Schedule, block, main) -> bool:
        """Whether `block` already iterates over the matmul's [s, i, j] space (same extents)."""
        a = [iv.dom.extent for iv in sch.get(block).iter_vars]
        b = [iv.dom.extent for iv in sch.get(main).iter_vars][:3]
        return len(a) == 3 and all(tvm_ffi.structural_equal(x, y) for x, y in zip(a, b))

    @staticmethod
    def _read_buffer(sch: s_tir.Schedule, block, idx: int) -> str:
        return sch.get(block).reads[idx].source.name

    @staticmethod
    def _inline_consumers(sch: s_tir.Schedule, main) -> None:
        """Inline every block after `main` into the last one (the copy out of the padded tile, the
        reindex view, bias, activation, residual...), so one block writes the output from the tile."""
        changed = True
        while changed:
            changed = False
            for c in sch.get_consumers(main):
                if sch.get_consumers(c) and _try(sch.compute_inline, c):
                    changed = True
                    break
                # inline the consumer's consumers back into it (reverse) when it is the output
                for cc in sch.get_consumers(c):
                    if _try(sch.reverse_compute_inline, cc):
                        changed = True
                        break
                if changed:
                    break

    @staticmethod
    def _pack(sch: s_tir.Schedule, block, tile, lanes: int, transpose_last: bool = False,
              max_vector: int | None = None) -> None:
        """A packing block ([s, x, k] from its producers) computed per tile, its producers inlined."""
        _inline_producers(sch, block)
        if transpose_last:
            # B panel as [s, k, j] so that the NR columns of each k are contiguous
            sch.transform_layout(block, ("write", 0), lambda s, j, k: (s, k, j))
        sch.compute_at(block, tile, preserve_unit_loops=True)
        loops = sch.get_loops(block)
        if transpose_last and len(loops) >= 2:
            # loop k outer, j inner: vector stores along j
            inner = loops[-2:]
            sch.reorder(inner[1], inner[0])
        _vectorize_inner(sch, block, lanes, max_vector=max_vector)


# ---------------------------------------------------------------------------------------------
# row reductions (softmax, norms) and injective kernels
# ---------------------------------------------------------------------------------------------

class RowReduction(_CpuRule):
    """Reductions over trailing axes with elementwise blocks around them (softmax, layer_norm, ...)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.applies(func, target):
            return None
        from tvm.s_tir.dlight.cpu import Reduction

        try:
            return Reduction().apply(func, target, tunable)
        except Exception:  # noqa: BLE001
            return None


class Injective(_CpuRule):
    """Elementwise and data-movement kernels: inline into the last block, vectorise, parallel."""

    def __init__(self, min_parallel: int = 64):
        self.min_parallel = min_parallel

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.applies(func, target) or (started := _schedule(func)) is None:
            return None
        sch, blocks = started
        if not blocks or not all(_is_spatial(sch, b) for b in blocks):
            return None
        for b in blocks[:-1]:
            _try(sch.compute_inline, b)
        lanes = vector_lanes(target)
        for b in _blocks(sch):
            loops = sch.get_loops(b)
            if not loops:
                continue
            _vectorize_inner(sch, b, lanes)
            loops = sch.get_loops(b)
            outer = [l for l in loops if sch.get(l).kind == tirx.ForKind.SERIAL]
            if len(outer) == len(loops) and len(outer) > 1:
                outer = outer[:-1]  # keep the innermost serial (contiguous) loop in each task
            if outer:
                _parallel_outer(sch, outer, self.min_parallel)
        return sch


# ---------------------------------------------------------------------------------------------
# fast math: vectorisable exp/erf/tanh on CPU
# ---------------------------------------------------------------------------------------------

def _fast_math_mutator():
    from tvm import relax, topi
    from tvm.relax import PyExprMutator, expr_functor

    def f32(call) -> bool:
        ty = getattr(call.args[0], "ty", None)
        return getattr(ty, "dtype", None) == "float32"

    def gelu(x):
        return topi.multiply(topi.multiply(x, tirx.const(0.5, "float32")),
                               topi.add(tirx.const(1.0, "float32"),
                                        topi.fast_erf(topi.multiply(x, tirx.const(math.sqrt(0.5), "float32")))))

    def gelu_tanh(x):
        c = tirx.const(math.sqrt(2.0 / math.pi), "float32")
        inner = topi.multiply(c, topi.add(x, topi.multiply(tirx.const(0.044715, "float32"),
                                                           topi.multiply(x, topi.multiply(x, x)))))
        return topi.multiply(topi.multiply(x, tirx.const(0.5, "float32")),
                             topi.add(tirx.const(1.0, "float32"), topi.fast_tanh(inner)))

    def sigmoid(x):
        one = tirx.const(1.0, "float32")
        return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))

    def silu(x):
        return topi.multiply(x, sigmoid(x))

    table = {
        "relax.exp": topi.fast_exp,
        "relax.erf": topi.fast_erf,
        "relax.tanh": topi.fast_tanh,
        "relax.sigmoid": sigmoid,
        "relax.nn.gelu": gelu,
        "relax.nn.gelu_tanh": gelu_tanh,
        "relax.nn.silu": silu,
    }

    @expr_functor.mutator
    class FastMath(PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - the visitor's name
            call = super().visit_call_(call)
            op = getattr(call.op, "name", None)
            if op is None or not call.args or not f32(call):
                return call
            if op == "relax.nn.softmax":
                return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis),
                                             primfunc_name_hint="softmax")
            fn = table.get(op)
            if fn is None:
                return call
            return self.builder_.call_te(fn, call.args[0], primfunc_name_hint=op.split(".")[-1])

    return FastMath


@tvm.transform.module_pass(opt_level=0, name="SpeccCPUFastMath")
class CPUFastMath:
    """exp, erf, tanh, sigmoid, softmax, gelu, silu (float32) as TVM's fast (polynomial) versions.

    LLVM turns exp/erf/tanh into scalar libm calls that do not vectorise; topi's fast_exp,
    fast_erf and fast_tanh are branch-free polynomials that do. Measured against float64 over
    [-100, 100]: relative error <= 3.5e-7 (float32 rounding); differences at the edges: exp
    flushes results below ~1.2e-38 to 0 (libm returns subnormals) and overflows from 88.7 rather
    than 88.72; erf(nan) is +1 rather than nan.
    """

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        from tvm import relax

        mutator = _fast_math_mutator()(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------

def default_rules() -> list[ScheduleRule]:
    return [Matmul(), RowReduction(), Injective()]


@tvm.transform.module_pass(opt_level=0, name="SpeccApplyCPUSchedules")
class ApplyCPUSchedules:
    """Apply `rules` (default: Matmul, RowReduction, Injective) to every unscheduled PrimFunc."""

    def __init__(self, target: Target | None = None, rules: list[ScheduleRule] | None = None):
        self.target = target
        self.rules = rules if rules is not None else default_rules()
        self.applied: dict[str, str] = {}

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        from tvm.relax.analysis import has_reshape_pattern

        target = self.target or Target.current(allow_none=False)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and _IS_SCHEDULED in func.attrs and int(func.attrs[_IS_SCHEDULED]) == 1:
                continue
            try:
                if has_reshape_pattern(func):
                    continue
            except Exception:  # noqa: BLE001 - hand-written TIR without a root block (the LSTM scan)
                continue
            for rule in self.rules:
                sch = rule.apply(func, target, False)
                if sch is None:
                    continue
                updates[gv] = sch.mod["main"].with_attr(_IS_SCHEDULED, True)
                self.applied[gv.name_hint] = type(rule).__name__
                break
        for gv, func in updates.items():
            mod[gv] = func
        return mod


__all__ = ["ApplyCPUSchedules", "matmul_order", "CPUFastMath", "Matmul", "RowReduction", "Injective", "default_rules", "vector_lanes",
           "matmul_config", "MatmulConfig"]
