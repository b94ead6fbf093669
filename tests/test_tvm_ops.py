"""Relax lowerings of the convolutional, mask and position ops: tvm-llvm against the PyTorch backend on
the same weights and inputs.

One small spec per op family, each compiled once and run at two sizes of its symbolic dimensions.
The oracle is the PyTorch backend's module in float64 (values it creates, e.g. one-hot vectors and
rotary angles, in float64 too); the TVM model runs in float32. Float outputs: max |tvm - oracle| <=
1e-4 * max(1, max |oracle|) (test_tvm_equivalence's tolerance); bool and integer outputs: equal.
Weights are the seeded initial weights plus seeded noise on every float tensor (batch-norm running
statistics included), so that gains of 1 and zero biases or means cannot hide a mapping error.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

import specc  # noqa: E402
from specc.backends.pytorch.build import artifacts, load_in_memory  # noqa: E402
from specc.backends.pytorch.weights import init_weights  # noqa: E402
from specc.backends.tvm.build import compile_graph  # noqa: E402

TOL = 1e-4


def noisy(weights: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Seeded noise on the float tensors (integer buffers such as num_batches_tracked as they are)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in sorted(weights.items())}


def float64_run(model: torch.nn.Module, inputs) -> tuple[torch.Tensor, ...]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            out = model(*[x.double() if x.is_floating_point() else x for x in inputs])
    finally:
        torch.set_default_dtype(previous)
    return out if isinstance(out, tuple) else (out,)


def check(text: str, runs: list[dict], name: str, **overrides) -> None:
    """Compile `text` once for tvm-llvm; at each dims of `runs`, compare every output with the oracle."""
    graph = specc.compile(text, **overrides)
    weights = noisy(init_weights(graph))
    model = load_in_memory(artifacts(graph, text, f"{name}.yaml"))
    model.load_state_dict(weights)
    oracle = model.double()
    runner = compile_graph(graph, weights=weights)
    names = [n for n, _ in graph.outputs]
    for seed, dims in enumerate(runs):
        inputs = model.example_inputs(seed=seed, **dims)
        got = runner(*inputs)
        got = got if isinstance(got, tuple) else (got,)
        want = float64_run(oracle, inputs)
        assert len(got) == len(want) == len(names)
        for out, g, w in zip(names, got, want):
            what = f"{name}: output {out} at {dims}"
            assert tuple(g.shape) == tuple(w.shape), f"{what}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
            if w.is_floating_point():
                assert g.dtype == torch.float32, f"{what}: {g.dtype}"
                assert torch.isfinite(w).all(), f"{what}: the oracle is not finite (a bad test input)"
                err = (g.double() - w).abs().max().item()
                bound = TOL * max(1.0, w.abs().max().item())
                assert err <= bound, f"{what}: max |tvm - float64 torch| = {err:.3g} > {bound:.3g}"
            else:
                assert g.dtype == w.dtype, f"{what}: {g.dtype} vs {w.dtype}"
                assert torch.equal(g, w), f"{what}: differs at {(g != w).nonzero()[:5].tolist()}"


def spec(name: str, inputs: str, graph: str, outputs: str, dims: str = "B: 2") -> str:
    indent = lambda s: "\n".join("  " + line for line in s.strip().splitlines())  # noqa: E731
    return (f"specc: 1\nname: {name}\ndims:\n{indent(dims)}\ninputs:\n{indent(inputs)}\n"
            f"graph: |\n{indent(graph)}\noutputs:\n{indent(outputs)}\n")


def test_conv1d():
    """stride, padding, dilation, groups, 'same' padding (uneven for an even kernel: 0 before, 1 after for
    kernel 2), with and without bias; a symbolic length L (one library for every L)."""
    check(spec("conv1d", "x: f32[B, 4, 17]\nv: f32[B, 4, L]", """
a = conv1d(x, 6, 3, stride=2, padding=1)
b = conv1d(x, 4, 4, padding='same', dilation=2, groups=2, bias=false)
c = conv1d(relu(b), 8, 1, groups=4)
y = concat([a, conv1d(x, 6, 5, stride=3, dilation=2)], dim=-1)
z = conv1d(v, 3, 3, padding=1) + conv1d(v, 3, 4, padding='same', dilation=2, bias=false) + conv1d(v, 3, 1)
w = conv1d(v, 3, 2, padding='same') + conv1d(v, 3, 1, padding=1)[:, :, 1:-1]
""", "y: f32[B, 6, 12]\nc: f32[B, 8, 17]\nz: f32[B, 3, L]\nw: f32[B, 3, L]", dims="B: 2\nL: 9"),
          [dict(B=1, L=9), dict(B=3, L=5)], "conv1d")


def test_conv2d():
    check(spec("conv2d", "x: f32[B, 4, 9, 8]", """
a = conv2d(x, 6, [3, 2], stride=[2, 1], padding=[1, 0], dilation=[1, 2])
b = conv2d(x, 4, 4, padding='same', groups=4, bias=false)
c = conv2d(b, 6, 3, stride=2, padding='valid', groups=2)
d = conv2d(x, 2, 1)
""", "a: f32[B, 6, 5, 6]\nc: f32[B, 6, 4, 3]\nd: f32[B, 2, 9, 8]"), [dict(B=1), dict(B=2)], "conv2d")


def test_conv2d_over_symbolic_image_sizes():
    """Stride-1 convolutions over symbolic H and W: one implicit-GEMM kernel on the padded width (every
    tap a fixed offset into the flattened input), the batch its own matmul axis, the padding columns
    dropped after; 'same', explicit, uneven and no padding, dilation, 1xk and kx1 and 1x1 kernels, a
    fused activation after. One library at three image sizes, odd widths included. (A strided one needs
    a fixed size or a multiple of the stride, and takes the general kernel.)"""
    text = spec("conv2d_symbolic", "x: f32[B, 5, H, W]", """
a = sigmoid(conv2d(x, 6, 3, padding=1))
b = conv2d(x, 4, [2, 3], padding='same', dilation=[2, 1], bias=false)
c = conv2d(x, 3, [1, 3], padding=[0, 1]) + conv2d(x, 3, [3, 1], padding=[1, 1])[:, :, :, 1:-1]
d = conv2d(relu(x), 2, 1)
e = conv2d(x, 4, 3)
""", "a: null\nb: null\nc: null\nd: null\ne: null", dims="B: 2\nH: {example: 7}\nW: {example: 6}")
    check(text, [dict(B=1, H=7, W=6), dict(B=3, H=5, W=9), dict(B=2, H=4, W=4)], "conv2d_symbolic")
    from tvm import tirx

    from specc.backends.tvm.lowering import to_relax

    mod, _ = to_relax(specc.compile(text), "llvm", "main")
    def wide(f) -> bool:  # the output as wide as the (padded) input, read through the batch axis
        x, out = f.params[0].ty, f.params[-1].ty
        return out.shape[-1].same_as(x.shape[-1]) and "specc.batch" in f.script()

    kernels = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("conv") and isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 6 and all(wide(f) for f in kernels), [gv.name_hint for gv, _ in mod.functions_items()]


def test_conv2d_implicit_gemm_shapes():
    """The ungrouped CPU convolution is one implicit-GEMM kernel (the window gather inside the Matmul
    schedule's packing): output rows wider than a vector (16 x 16), a whole fraction of one (8, 4: the
    packing vectors cut to a row), and neither (5 x 5, 3 x 7); strides 1 and 2; 1x1 with and without
    padding; channels not a multiple of the register tile; bias, residual and activation fused after."""
    check(spec("conv2d_gemm", "x: f32[B, 3, 16, 16]\ny: f32[B, 5, 5, 5]\nz: f32[B, 6, 3, 7]", """
a = relu(conv2d(x, 7, 3, padding=1))
b = relu(conv2d(a, 10, 3, stride=2, padding=1))
c = conv2d(b, 10, 3, padding=1) + b
d = conv2d(c, 4, 1, stride=2)
e = conv2d(y, 9, 3, padding=1) + conv2d(y, 9, 1, padding=0)
f = conv2d(y, 6, 1, padding=1)
g = silu(conv2d(z, 5, [3, 5], padding=[1, 2]))
""", "c: f32[B, 10, 8, 8]\nd: f32[B, 4, 4, 4]\ne: f32[B, 9, 5, 5]\nf: f32[B, 6, 7, 7]\ng: f32[B, 5, 3, 7]"),
          [dict(B=1), dict(B=3)], "conv2d_gemm")


def test_ungrouped_convolution_is_one_kernel_with_its_epilogue():
    """On CPU an ungrouped conv is one fused kernel with the bias and activation (no im2col kernel, no
    [C * k, B * P] column matrix): after scheduling, the window gather is computed inside B's
    packing, so no block writes the gathered columns whole; a grouped conv keeps its im2col kernel."""
    import tvm
    from tvm import tirx

    from specc.backends.tvm import schedules
    from specc.backends.tvm.build import FUNC, make_target, pre_schedule_passes
    from specc.backends.tvm.lowering import to_relax

    graph = specc.compile(spec("convs", "x: f32[B, 8, 16, 16]", """
a = relu(conv2d(x, 16, 3, padding=1))
g = conv2d(a, 16, 3, padding=1, groups=2)
""", "g: f32[B, 16, 16, 16]"))
    tgt = make_target("llvm")
    mod, _ = to_relax(graph, "llvm", FUNC)
    with tgt:
        mod = tvm.transform.Sequential(pre_schedule_passes(tgt))(mod)
        apply = schedules.ApplyCPUSchedules(tgt)
        out = apply(mod)
    names = [gv.name_hint for gv, f in out.functions_items() if isinstance(f, tirx.PrimFunc)]
    conv = [n for n in names if n.startswith("fused_conv") and "relu" in n]
    assert len(conv) == 1, names
    assert apply.applied.get(conv[0]) == "Matmul"
    assert sum(n.startswith("im2col") for n in names) == 1, names  # the grouped conv's
    text = out[conv[0]].script()
    assert 'sblock("im2col")' not in text and 'sblock("im2col_reindex' in text, text


def test_batch_norm_inference_uses_the_running_statistics():
    """[B, C], [B, C, L] and [B, C, H, W]; affine and not; eps. The running mean and variance (buffers,
    perturbed away from 0 and 1) are what inference reads."""
    check(spec("bn", "x: f32[B, 3, 5, 4]\nv: f32[B, 6, L]\nu: f32[B, 5]", """
a = batch_norm(x)
b = batch_norm(v, eps=0.01, affine=false)
c = batch_norm(u * 3.0, momentum=0.5)
""", "a: f32[B, 3, 5, 4]\nb: f32[B, 6, L]\nc: f32[B, 5]", dims="B: 2\nL: 7"),
          [dict(B=1, L=3), dict(B=4, L=9)], "bn")


def test_pools():
    """max/avg 1d/2d with strides, paddings (max: padding never wins; avg: padded zeros counted), the
    default stride (the kernel), adaptive average pooling to sizes that do not divide the input."""
    check(spec("pools", "x: f32[B, 3, 9, 7]\nv: f32[B, 2, 11]", """
a = max_pool2d(x, [3, 2], stride=[2, 1], padding=[1, 0])
b = avg_pool2d(x, 3, stride=2, padding=1)
c = max_pool2d(x - 5.0, 2)
d = avg_pool2d(x, [2, 3], stride=[1, 2])
e = max_pool1d(v - 5.0, 3, stride=2, padding=1)
f = avg_pool1d(v, 2)
g = avg_pool1d(v, 3, stride=1, padding=1)
h = adaptive_avg_pool2d(x, [4, 3])
k = adaptive_avg_pool2d(x)
m = avg_pool2d(x, [2, 3], stride=1, padding=[0, 1])
""", """
a: f32[B, 3, 5, 6]
b: f32[B, 3, 5, 4]
c: f32[B, 3, 4, 3]
d: f32[B, 3, 8, 3]
e: f32[B, 2, 6]
f: f32[B, 2, 5]
g: f32[B, 2, 11]
h: f32[B, 3, 4, 3]
k: f32[B, 3, 1, 1]
m: f32[B, 3, 8, 7]
"""), [dict(B=1), dict(B=3)], "pools")


def test_upsample_nearest_and_linear():
    check(spec("ups", "x: f32[B, 2, 3, 4]\nv: f32[B, 3, L]", """
a = upsample(x)
b = upsample(x, scale=3, mode='bilinear')
c = upsample(v, scale=3)
d = upsample(v, mode='linear')
e = upsample(v, scale=4, mode='linear')
""", """
a: f32[B, 2, 6, 8]
b: f32[B, 2, 9, 12]
c: f32[B, 3, 3 * L]
d: f32[B, 3, 2 * L]
e: f32[B, 3, 4 * L]
""", dims="B: 2\nL: 5"), [dict(B=1, L=5), dict(B=2, L=2)], "ups")


def test_comparisons_logic_where_and_masked_fill():
    """Every comparison (float, integer, bool, mixed dtypes promoted, numbers), and/or/not, where with numbers
    and a broadcast condition, masked_fill on float and integer tensors; bool outputs compared exactly."""
    check(spec("cmp", "x: f32[B, T]\ny: f32[B, T]\nids: i64[B, T] in range(6)\nrow: bool[T]", """
small = x < y
m = logical_and(ids == 3, not small) or (ids != 2 and x >= 0.5)
n = logical_or(x <= y, ids > 4) and row
k = ids >= 2
w = where(m, x, 0.0) + where(n, -1.0, y) + where(row, x, y)
f = masked_fill(x, small, -2.5) + cast(masked_fill(ids, k, 7), f32) + cast(ids < x, f32)
e = logical_or(((x > 0.0) == row) != k, small < (y > 0.0)) == (small >= n)
""", "m: bool[B, T]\nn: bool[B, T]\nw: f32[B, T]\nf: f32[B, T]\ne: bool[B, T]", dims="B: 2\nT: 6"),
          [dict(B=1, T=6), dict(B=3, T=11)], "cmp")


def test_tril_triu_ones_zeros():
    """Bool and float triangles, diagonals above and below; a triangle of a softmax over [B, T, T] (the
    row kernel's buffers share one T with the triangle's, which FuseTIR needs); filled tensors of
    symbolic and fixed sizes in four dtypes."""
    check(spec("tri", "x: f32[B, T, T]\ns: f32[B, 3, 5]", """
causal = tril(ones(T, T, dtype=bool))
upper = triu(ones(T, T, dtype=bool), diagonal=1)
a = tril(x) + triu(x, diagonal=1) * 2.0 + tril(x, diagonal=-1) * 3.0
b = triu(s, diagonal=-1) + tril(s, diagonal=2) + zeros(B, 3, 5) + ones(5)
c = cast(causal, f32) + cast(zeros(T, T, dtype=i64), f32) + cast(ones(B, T, T, dtype=i32), f32)
d = tril(softmax(x), diagonal=-1)
""", "causal: bool[T, T]\nupper: bool[T, T]\na: f32[B, T, T]\nb: f32[B, 3, 5]\nc: f32[B, T, T]\nd: f32[B, T, T]",
               dims="B: 2\nT: 4"), [dict(B=1, T=4), dict(B=2, T=7)], "tri")


def test_rotary_with_and_without_positions():
    """Default positions (arange(T)); positions [T]; per-batch positions [B, T] on [B, T, d] and on
    per-head [B, h, T, d]; a non-default base."""
    check(spec("rope", "x: f32[B, T, 8]\nq: f32[B, 2, T, 6]\npos: i64[T] in range(64)\nbpos: i64[B, T] in range(64)",
               """
a = rotary(x)
b = rotary(x, positions=pos, base=500.0)
c = rotary(x, positions=bpos)
d = rotary(q, positions=bpos) + rotary(q)
""", "a: f32[B, T, 8]\nb: f32[B, T, 8]\nc: f32[B, T, 8]\nd: f32[B, 2, T, 6]", dims="B: 2\nT: 5"),
          [dict(B=1, T=5), dict(B=3, T=9)], "rope")


def test_one_hot():
    """The f32 one-hot vectors of i64 ids, and a linear layer on them."""
    check(spec("onehot", "ids: i64[B, T] in range(7)\nc: i64[B] in range(3)", """
h = one_hot(ids, 7)
y = linear(h, 4)
z = linear(one_hot(c, 5), 4)
""", "h: f32[B, T, 7]\ny: f32[B, T, 4]\nz: f32[B, 4]", dims="B: 2\nT: 5"), [dict(B=1, T=5), dict(B=4, T=3)], "onehot")


def test_attention_masks():
    """mask=: bool [B, T, T] (from an input, with the diagonal kept so no row is empty) together with
    causal; float [T, T] added to the scores; per-head bool [B, h, T, T]; cross-attention (kv) with a
    bool [B, T, S] mask whose first key is always allowed."""
    check(spec("amask", "x: f32[B, T, 8]\nm: bool[B, T, T]\nf: f32[T, T]\nmh: bool[B, 2, T, T]\n"
                        "kv: f32[B, S, 8]\nms: bool[B, T, S]", """
eye = tril(triu(ones(T, T, dtype=bool)))
a = attention(x, heads=2, causal=true, mask=m or eye)
b = attention(x, heads=2, mask=f * 0.5)
c = attention(x, heads=2, mask=mh or eye, bias=false)
keep = concat([ones(B, T, 1, dtype=bool), ms[:, :, 1:]], dim=-1)
d = attention(x, heads=4, kv=kv, mask=keep)
""", "a: f32[B, T, 8]\nb: f32[B, T, 8]\nc: f32[B, T, 8]\nd: f32[B, T, 8]", dims="B: 2\nT: 5\nS: 3"),
          [dict(B=1, T=5, S=3), dict(B=2, T=7, S=4)], "amask")


def test_selection_ops():
    """amax/amin over one axis, a list of axes and all of them (floats and integers), argmax (ties: the
    first index, as torch), gather along the last and a middle axis, unsqueeze and x[:, None]."""
    check(spec("select", "x: f32[B, T, 6]\nids: i64[B, T] in range(6)\nrows: i64[B, 2, 6] in range(5)", """
a = amax(x, dim=-1) + amin(x, dim=[1, 2], keepdim=true)[:, :, 0] + amax(x)
k = amax(ids, dim=1) + amin(ids)
c = argmax(x)
t = argmax(cast(ids > 2, f32), dim=1, keepdim=true)
g = gather(x, unsqueeze(ids, -1)) + gather(x[:, 0:5], rows[:, :, 0:1] + 0 * rows[:, :, 0:1], dim=1)[:, 0:1, :]
u = unsqueeze(x, 1) + x[:, None]
""".replace("gather(x[:, 0:5], rows[:, :, 0:1] + 0 * rows[:, :, 0:1], dim=1)[:, 0:1, :]",
            "gather(x[:, 0:5], rows, dim=1)[:, 0:1, 0:1]"),
               "a: f32[B, T]\nk: i64[B]\nc: i64[B, T]\nt: i64[B, 1]\ng: f32[B, T, 1]\nu: f32[B, 1, T, 6]",
               dims="B: 2\nT: {example: 5, min: 5}"), [dict(B=1, T=5), dict(B=3, T=8)], "select")


def test_rot90_and_grad_reverse():
    """rot90 by k = 1, 2, -1 (= 3) and 4, in the default plane and another one; grad_reverse is the
    identity forward."""
    check(spec("rot", "x: f32[B, 3, 4, 5]\nlam: f32[]", """
a = rot90(x) + rot90(x, k=-1) * 2.0
b = rot90(x, k=2) + rot90(x, k=4)
c = rot90(x, k=3, dims=[1, 3])
g = grad_reverse(x, lam) + grad_reverse(x, 0.5)
""", "a: f32[B, 3, 5, 4]\nb: f32[B, 3, 4, 5]\nc: f32[B, 5, 4, 3]\ng: f32[B, 3, 4, 5]"), [dict(B=1), dict(B=2)], "rot")


def test_attend_prefix_and_broadcast_keys():
    """attend over the spec's own projections (causal, masked, with a prefix); attention with prefix=
    (shared by the batch: [2, l, d], and per batch row: [B, 2, l, d]) together with causal and a mask, and
    cross-attention to keys whose batch dimensions broadcast ([S, d] memory for every batch row)."""
    check(spec("attend", "x: f32[B, T, 8]\nm: bool[B, T, T]\nmem: f32[S, 6]\npb: f32[B, 2, 2, 8]", """
q = linear(x, 8)
k = linear(x, 8, bias=false)
v = linear(x, 8)
eye = tril(triu(ones(T, T, dtype=bool)))
p = parameter(2, 3, 8)
a = attend(q, k, v, heads=2, causal=true)
b = attend(q, k, v, heads=4, mask=m or eye, prefix=p)
c = attention(x, heads=2, prefix=p, causal=true, mask=m or eye)
e = attention(x, heads=2, prefix=pb)
f = attention(x, heads=2, kv=mem)
y = a + b + c + e + f
""", "y: f32[B, T, 8]", dims="B: 2\nT: 5\nS: 3"), [dict(B=1, T=5, S=3), dict(B=2, T=7, S=4)], "attend")


def test_moe_mlp_routes_each_token_to_its_expert():
    check(spec("moe", "x: f32[B, T, 6]\nroute: i64[B, T] in range(3)", """
a = moe_mlp(x, route, experts=3, hidden=8)
b = moe_mlp(x, route, experts=3, hidden=4, out=5, act=relu, bias=false)
""", "a: f32[B, T, 6]\nb: f32[B, T, 5]", dims="B: 2\nT: 5"), [dict(B=1, T=5), dict(B=3, T=4)], "moe")


#: (inputs, graph, outputs, dims, sizes of the static copies)
STATIC_CONVS = {
    "batch": ("x: f32[B, 3, 8, 8]", "y = conv2d(relu(conv2d(x, 4, 3, padding=1)), 4, 3, stride=2, padding='valid', groups=2)",
              "y: f32[B, 4, 3, 3]", "B: 2", [{"B": 2}, {"B": 3}]),
    # symbolic spatial sizes: the input padded to L + 2 (H + 2, W + 2), an output L - 2 (unfused)
    "length": ("v: f32[B, 4, L]", "a = relu(conv1d(v, 5, 3, padding=1))\nb = relu(conv1d(v, 5, 3))",
               "a: f32[B, 5, L]\nb: f32[B, 5, L - 2]", "B: 2\nL: 9", [{"B": 2, "L": 9}]),
    "height_width": ("v: f32[B, 4, H, W]", "a = relu(conv2d(v, 5, 3, padding=1))", "a: f32[B, 5, H, W]",
                     "B: 2\nH: 6\nW: 7", [{"B": 1, "H": 6, "W": 7}]),
    # the lowering's TE kernels (nan-keeping reductions and pools, float //) after fusable producers, one
    # over an input of size L - 2 (a size argument L beside its buffers)
    "te_kernels": ("v: f32[B, 4, L]",
                   "a = amax(relu(conv1d(v, 5, 3)) * 2.0, dim=-1)\nb = argmax(v * 2.0 - 1.0, dim=-1)\n"
                   "c = max_pool1d(concat([v, v], dim=-1) + 1.0, 2)\ne = amin(v[:, :, 1:] + 1.0, dim=1)\n"
                   "f = (v // 0.75) * 2.0",
                   "a: f32[B, 5]\nb: i64[B, 4]\nc: f32[B, 4, L]\ne: f32[B, L - 1]\nf: f32[B, 4, L]",
                   "B: 2\nL: 9", [{"B": 2, "L": 9}, {"B": 1, "L": 4}]),
}


@pytest.mark.parametrize("name", sorted(STATIC_CONVS))
def test_convolution_in_the_static_shape_copies_tuning_adds(name):
    """Tuning compiles static-shape copies of `main` beside it (tuning.specialise); the conv kernels (TIR
    functions over size variables of their own: the implicit GEMM, fused there with its bias and
    activation, and the grouped conv's im2col) must compile and compute the same there."""
    import numpy as np
    import tvm
    from tvm import relax

    from specc.backends.tvm.build import FUNC, make_target, pipeline
    from specc.backends.tvm.lowering import parameters, to_relax
    from specc.backends.tvm.tuning import spec_name, specialise

    inputs, body, outputs, dims, copies = STATIC_CONVS[name]
    graph = specc.compile(spec("convs", inputs, body, outputs, dims=dims))
    mod, _ = to_relax(graph, "llvm", FUNC)
    mod = specialise(mod, copies)
    tgt = make_target("llvm")
    with tgt:
        ex = tvm.compile(mod, tgt, relax_pipeline=pipeline(tgt, shared=True))  # as build_module does
    vm = relax.VirtualMachine(ex, tvm.cpu())
    weights = noisy(init_weights(graph))
    lifted = vm["transform_params"]([tvm.runtime.tensor(weights[name].numpy()) for name, _ in parameters(graph)])
    ws = [lifted[i] for i in range(len(lifted))]
    for sizes in copies:
        shape = [sizes.get(str(d), d) for d in graph.node(graph.inputs[0][1]).type.shape]
        x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"))
        general, static = vm["main"](x, *ws), vm[spec_name(sizes)](x, *ws)
        pairs = [(general, static)] if hasattr(general, "numpy") else list(zip(general, static))
        for g, s in pairs:
            assert s.numpy().shape == g.numpy().shape
            np.testing.assert_allclose(s.numpy(), g.numpy(), rtol=1e-5, atol=1e-6)


def test_convolution_of_a_size_that_is_an_expression():
    """Implicit-GEMM kernels whose input size is a product (2 * T after a concat, 4 * B), strided, with an
    epilogue: their size variables bind to whatever the caller's shape is."""
    check(spec("conv_expr", "u: f32[B, 4, T]\nw: f32[B, 4, 6, 6]", """
v = concat([u, u * 2.0], dim=-1)
a = relu(conv1d(v, 5, 3, stride=2, padding=1))
b = conv1d(v, 5, 2, stride=2) + a
z = relu(conv2d(concat([w, w * 2.0, w, w], dim=0), 5, 3, padding=1))
""", "b: f32[B, 5, T]\nz: f32[4 * B, 5, 6, 6]", dims="B: 2\nT: 4"), [dict(B=1, T=4), dict(B=3, T=6)], "conv_expr")


def test_integer_pow_and_number_operands():
    """pow on integers (Relax's power takes floats: computed in float64 and rounded back) with numbers
    cast to the other operand's dtype; exact."""
    check(spec("ipow", "ids: i64[B, T] in range(6)\nx: f32[B, T]", """
p = 2 ** arange(T) + ids ** 3 + 3 ** ids
y = x ** 2 + cast(p, f32)
""", "p: i64[B, T]\ny: f32[B, T]", dims="B: 2\nT: 5"), [dict(B=1, T=5), dict(B=3, T=9)], "ipow")


@pytest.mark.parametrize("hidden", [5, 20])
def test_lstm_kernel_tiles_directions_and_single_steps(hidden):
    """The CPU recurrence kernel at hidden sizes whose gate tiles (4H = 20: 4 wide; 80: 16 wide) and
    state vectors (5: 1 wide; 20: 4 wide) differ, both directions, two layers, a one-step sequence
    (no recurrent product) and batch rows running in parallel."""
    text = spec("lstm_tiles", "x: f32[B, T, 6]",
                f"y = lstm(x, {hidden}, layers=2, bidirectional=true)", f"y: f32[B, T, {2 * hidden}]",
                dims="B: 2\nT: 3")
    check(text, [{"B": 1, "T": 1}, {"B": 3, "T": 7}, {"B": 5, "T": 2}], f"lstm_h{hidden}")



def test_detach():
    """detach is the identity forward (it stops gradients only), also feeding a layer and an arithmetic."""
    check(spec("detach", "x: f32[B, 3, 4]", """
h = linear(detach(x), 5)
y = detach(h) * h + detach(x[:, :, 0:1])
""", "y: f32[B, 3, 5]"), [dict(B=1), dict(B=2)], "detach")


def test_flow_ops():
    """warp, splat (sum and average) and correlation, at symbolic image sizes; flows of about 1 pixel and,
    scaled by 4, ones that push taps outside the image."""
    text = spec("flow_ops", "x: f32[B, 3, H, W]\ny: f32[B, 3, H, W]\nflow: f32[B, 2, H, W]",
                "far = flow * 4.0\nw = warp(x, flow) + warp(y, far)\ns = splat(x, flow) + splat(y, far)\n"
                "a = splat(x, far, mode='average')\nc = correlation(x, y, radius=2)",
                "w: null\ns: null\na: null\nc: null", dims="B: 2\nH: 5\nW: 6")
    check(text, [dict(B=1, H=5, W=6), dict(B=3, H=4, W=7)], "flow_ops")
