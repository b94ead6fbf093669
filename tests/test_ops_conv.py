"""The operators of convolutional models: conv1d/conv2d, batch_norm, max/avg pools, adaptive average
pooling and upsample. Each small spec is built through specc (the generated module), cast to float64,
and compared with direct torch.nn.functional calls on the same weights; shape-rule errors are checked
at their exact line:col with their message; FLOPs against their formula at two sizes.

Tolerance: generated float64 module vs functional float64 call: max abs error <= 1e-10 (the same
kernels on the same data; in practice the results are bitwise equal).
"""

from __future__ import annotations

import functools

import importlib.util
import math
import sys
import uuid

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import specc
from specc.compiler.summary import summarize
from opcheck import assert_error, close, flops_of, inputs64, load64, output_types, spec_text


# Specs with a batch norm right after a conv are built at -O0: -O1 folds the two into one conv
# (compiler/passes/conv.py, tested on its own), and these tests look at the batch norm module itself.


spec = functools.partial(spec_text, dims="B: 2, T: 8")

# ---------------------------------------------------------------------------------------------
# conv1d / conv2d
# ---------------------------------------------------------------------------------------------

CONV1D = [  # (arguments in the spec, functional keyword arguments)
    ("6, 3", dict()),
    ("6, kernel=5, stride=2, padding=2, dilation=2", dict(stride=2, padding=2, dilation=2)),
    ("6, 4, padding='same', dilation=2", dict(padding="same", dilation=2)),
    ("6, 3, groups=2, bias=false", dict(groups=2)),
    ("4, 1, padding='valid', groups=4", dict(groups=4)),
]


@pytest.mark.parametrize("args,kw", CONV1D, ids=[a for a, _ in CONV1D])
def test_conv1d_matches_functional(args, kw):
    text = spec("x: 'f32[B, 4, 13]'", f"y = conv1d(x, {args})")
    model = load64(text)
    sd = model.state_dict()
    (x,) = inputs64(model)
    with torch.no_grad():
        close(model(x), F.conv1d(x, sd["y.weight"], sd.get("y.bias"), **kw))
    assert ("y.bias" in sd) == ("bias=false" not in args)
    assert tuple(specc.check(text).outputs[0].example_shape) == tuple(model(x).shape)


CONV2D = [
    ("8, 3, padding=1", dict(padding=1)),
    ("8, [3, 1], stride=[2, 1], padding=[1, 0]", dict(stride=(2, 1), padding=(1, 0))),
    ("6, 2, stride=2", dict(stride=2)),
    ("6, [5, 3], padding='same', dilation=[1, 2], groups=3", dict(padding="same", dilation=(1, 2), groups=3)),
    ("3, 1, bias=false", dict()),
]


@pytest.mark.parametrize("args,kw", CONV2D, ids=[a for a, _ in CONV2D])
@pytest.mark.parametrize("opt_level", [0, 1])
def test_conv2d_matches_functional(args, kw, opt_level):
    text = spec("x: 'f32[B, 3, 9, 10]'", f"y = conv2d(x, {args})")
    model = load64(text, opt_level)
    sd = model.state_dict()
    (x,) = inputs64(model, B=3)
    with torch.no_grad():
        close(model(x), F.conv2d(x, sd["y.weight"], sd.get("y.bias"), **kw))


def test_conv_weights_have_pytorch_shapes_and_default_init():
    text = spec("x: 'f32[B, 6, 8, 8]'", "y = conv2d(x, 32, [3, 2], groups=2)")
    graph = specc.compile(text)
    (node,) = [n for _, n in graph.nodes() if n.op == "conv2d"]
    assert [(p.name, p.shape) for p in node.params] == [("weight", (32, 3, 3, 2)), ("bias", (32,))]
    fan_in = 3 * 3 * 2
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) as nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert [p.init.kind for p in node.params] == ["uniform", "uniform"]
    assert all(p.init.args == (pytest.approx(bound),) for p in node.params)
    sd = specc.load(text).state_dict()
    ref = torch.nn.Conv2d(6, 32, (3, 2), groups=2)
    for k in ("weight", "bias"):
        assert sd[f"y.{k}"].shape == ref.state_dict()[k].shape
        assert sd[f"y.{k}"].abs().max() <= bound
        assert sd[f"y.{k}"].abs().max() > 0.8 * bound


def test_conv_generated_code_reads_like_torch(tmp_path):
    text = spec("x: 'f32[B, 3, 16, 16]'", "h = conv2d(x, 8, 3, stride=2, padding=1, bias=false)\n"
                                          "y = conv1d(reshape(h, B, 8, 64), 4, 3, padding='same', groups=4)")
    src = (specc.build(text, tmp_path / "out") / "model.py").read_text()
    assert "self.h = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)" in src
    assert "self.y = nn.Conv1d(8, 4, 3, padding='same', groups=4)" in src
    assert "h = self.h(x)  # (B, 8, 8, 8)" in src


def test_conv1d_over_a_symbolic_length():
    # stride 1: T - 2 for any T
    text = spec("x: 'f32[B, 4, T]'", "y = conv1d(x, 5, 3)")
    assert str(specc.check(text).outputs[0].type) == "f32[B, 5, (T - 2)]"
    model = load64(text)
    sd = model.state_dict()
    for t in (3, 11):
        (x,) = inputs64(model, T=t)
        close(model(x), F.conv1d(x, sd["y.weight"], sd["y.bias"]))
    # stride 2 over 2*T: floor((2T + 2 - 3) / 2) + 1 = T exactly
    text = spec("x: 'f32[B, 4, 2 * T]'", "y = conv1d(x, 5, 3, stride=2, padding=1)")
    assert str(specc.check(text).outputs[0].type) == "f32[B, 5, T]"
    model = load64(text)
    sd = model.state_dict()
    for t in (1, 6):
        (x,) = inputs64(model, T=t)
        close(model(x), F.conv1d(x, sd["y.weight"], sd["y.bias"], stride=2, padding=1))
    # 'same' keeps T
    assert str(specc.check(spec("x: 'f32[B, 4, T]'", "y = conv1d(x, 5, 4, padding='same')")).outputs[0].type) \
        == "f32[B, 5, T]"


def test_conv_errors_are_located_and_name_the_shapes():
    assert_error(spec("x: 'f32[B, 4, T]'", "y = conv1d(x, 5, 3, stride=2)"), 6, 23,
                 "conv1d: dimension 2 of x f32[B, 4, T] is the symbolic size T; with stride 2 the output size "
                 "floor((T - 3) / 2) + 1 is not a polynomial in it: give dimension 2 a fixed size, or declare it "
                 "as a multiple of 2 (e.g. 2 * T2 in the input's type: the size is then 2 times a symbol)")
    # ... and the way out it names works
    assert output_types(spec("x: 'f32[B, 4, 2 * T2]'", "y = conv1d(x, 5, 3, stride=2)", dims="B: 2, T2: 4")) == \
        ["f32[B, 5, (T2 - 1)]"]
    assert_error(spec("x: 'f32[B, 3, 16]'", "y = relu(conv2d(x, 8, 3))"), 6, 19,
                 "conv2d: expected x of layout [B, C, H, W] (rank 4), got f32[B, 3, 16] (rank 3)")
    assert_error(spec("x: 'f32[B, 4, 8, 8]'", "y = conv2d(x, 6, 3, groups=3)"), 6, 23,
                 "conv2d: the 4 input channels of x f32[B, 4, 8, 8] are not divisible by groups=3")
    assert_error(spec("x: 'f32[B, 6, 8, 8]'", "y = conv2d(x, 4, 3, groups=3)"), 6, 17,
                 "conv2d: out=4 is not divisible by groups=3")
    assert_error(spec("x: 'f32[B, 3, 8, 4]'", "y = conv2d(x, 8, kernel=[3, 5])"), 6, 20,
                 "conv2d: dimension 3 of x f32[B, 3, 8, 4] is 4, smaller than the window of kernel 5 (5 wide): "
                 "the output would be empty")
    assert_error(spec("x: 'f32[B, 3, 8, 8]'", "y = conv2d(x, 8, 3, stride=2, padding='same')"), 6, 33,
                 "conv2d: padding='same' needs stride 1, got stride=2")
    assert_error(spec("x: 'f32[B, 3, 8, 8]'", "y = conv2d(x, 8, [3, 3, 3])"), 6, 20,
                 "conv2d: kernel must be an integer or a list of 2 integers, got [3, 3, 3]")
    assert_error(spec("x: 'f32[B, 3, 8, 8]'", "y = conv2d(x, 8, 3, padding='full')"), 6, 23,
                 "conv2d: padding must be an integer, a list of 2 integers, 'same' or 'valid', got 'full'")
    assert_error(spec("x: 'f32[B, C, 8]'", "y = conv1d(x, 8, 3)"), 6, 14,
                 "conv1d: the number of input channels (dimension 1 of x) must be a fixed size, but it is the "
                 "symbolic dimension C")
    assert_error(spec("x: 'i64[B, 3, 8]'", "y = conv1d(x, 8, 3)"), 6, 14,
                 "conv1d: expected a floating-point tensor for 'x', got i64[B, 3, 8]")


def test_conv_flops():
    text = spec("x: 'f32[B, 4, 10, 12]'", "y = conv2d(x, 6, [3, 5], stride=[1, 2], padding=1, groups=2)")
    for b in (1, 5):
        out = b * 6 * 10 * 5  # H: (10 + 2 - 3) / 1 + 1 = 10, W: floor((12 + 2 - 5) / 2) + 1 = 5
        assert flops_of(text, "conv2d", B=b) == 2 * out * (4 // 2 * 3 * 5) + out
    text = spec("x: 'f32[B, 3, T]'", "y = conv1d(x, 8, 3, bias=false)")
    for b, t in ((1, 5), (3, 40)):
        assert flops_of(text, "conv1d", B=b, T=t) == 2 * (b * 8 * (t - 2)) * (3 * 3)


# ---------------------------------------------------------------------------------------------
# batch_norm
# ---------------------------------------------------------------------------------------------

def random_stats(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Weights, biases and running statistics away from their initial 1/0, so none can hide."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype)
        else:
            state[k] = v + torch.randn(v.shape, generator=gen, dtype=v.dtype)
    model.load_state_dict(state)
    return state


@pytest.mark.parametrize("shape", ["B, 5", "B, 5, 7", "B, 5, 4, 3"])
@pytest.mark.parametrize("options,eps", [("", 1e-5), (", eps=1e-3, momentum=0.2, affine=false", 1e-3)])
def test_batch_norm_inference_matches_functional(shape, options, eps):
    text = spec(f"x: 'f32[{shape}]'", f"y = batch_norm(x{options})")
    model = load64(text)
    sd = random_stats(model)
    (x,) = inputs64(model, B=4)
    affine = "affine=false" not in options
    with torch.no_grad():
        close(model(x), F.batch_norm(x, sd["y.running_mean"], sd["y.running_var"], sd.get("y.weight"),
                                     sd.get("y.bias"), training=False, eps=eps))
    assert ("y.weight" in sd) == affine


def test_batch_norm_training_uses_batch_statistics_and_updates_the_buffers():
    text = spec("x: 'f32[B, 3, 6, 6]'", "y = batch_norm(x, momentum=0.25)")
    model = load64(text)
    sd = {k: v.clone() for k, v in random_stats(model).items()}
    (x,) = inputs64(model, B=5)
    model.train()
    rm, rv = sd["y.running_mean"].clone(), sd["y.running_var"].clone()
    want = F.batch_norm(x, rm, rv, sd["y.weight"], sd["y.bias"], training=True, momentum=0.25)
    with torch.no_grad():
        close(model(x), want)
    after = model.state_dict()
    close(after["y.running_mean"], rm)
    close(after["y.running_var"], rv)
    assert after["y.num_batches_tracked"].item() == 1
    names = {n for n, _ in model.named_parameters()}
    assert names == {"y.weight", "y.bias"}
    assert {n for n, _ in model.named_buffers()} == {"y.running_mean", "y.running_var", "y.num_batches_tracked"}


def test_batch_norm_buffers_in_the_ir_and_the_summary():
    text = spec("x: 'f32[B, 8, 4, 4]'", "y = batch_norm(x)\nz = batch_norm(y, affine=false)", outputs="z")
    graph = specc.compile(text)
    params = {".".join(n.path + (p.name,)): p for _, n in graph.nodes() for p in n.params}
    assert {k: (p.shape, p.dtype, p.buffer, p.frozen, p.init.kind) for k, p in params.items()} == {
        "y.weight": ((8,), "f32", False, False, "ones"),
        "y.bias": ((8,), "f32", False, False, "zeros"),
        "y.running_mean": ((8,), "f32", True, True, "zeros"),
        "y.running_var": ((8,), "f32", True, True, "ones"),
        "y.num_batches_tracked": ((), "i64", True, True, "zeros"),
        "z.running_mean": ((8,), "f32", True, True, "zeros"),
        "z.running_var": ((8,), "f32", True, True, "ones"),
        "z.num_batches_tracked": ((), "i64", True, True, "zeros"),
    }
    s = specc.check(text)
    assert (s.params, s.trainable_params, s.buffers) == (16, 16, 2 * (8 + 8 + 1))
    assert s.param_bytes == 16 * 4 + 2 * (16 * 4 + 8)
    assert s.to_json()["buffers"] == 34


def test_batch_norm_buffers_are_written_and_loaded_by_the_built_files(tmp_path):
    text = spec("x: 'f32[B, 3, 8]'", "h = conv1d(x, 4, 3)\ny = relu(batch_norm(h))")
    out = specc.build(text, tmp_path / "out", opt_level=0)  # -O1 would fold the batch norm into the conv
    weights = load_file(str(out / "weights.safetensors"))
    assert {k: (tuple(v.shape), v.dtype) for k, v in weights.items() if k.startswith("batch_norm")} == {
        "batch_norm.weight": ((4,), torch.float32), "batch_norm.bias": ((4,), torch.float32),
        "batch_norm.running_mean": ((4,), torch.float32), "batch_norm.running_var": ((4,), torch.float32),
        "batch_norm.num_batches_tracked": ((), torch.int64)}
    assert torch.equal(weights["batch_norm.running_var"], torch.ones(4))
    name = f"ops_conv_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(name, out / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    src = (out / "model.py").read_text()
    assert "self.batch_norm = nn.BatchNorm1d(4)" in src
    model = module.load(out)  # strict about missing keys: the buffers must be in the file
    assert not model.training
    assert model.batch_norm.num_batches_tracked.dtype == torch.int64
    assert torch.equal(model.batch_norm.running_var, torch.ones(4))
    (x,) = module.example_inputs()
    with torch.no_grad():
        h = F.conv1d(x, weights["h.weight"], weights["h.bias"])
        want = F.relu(F.batch_norm(h, weights["batch_norm.running_mean"], weights["batch_norm.running_var"],
                                   weights["batch_norm.weight"], weights["batch_norm.bias"]))
        assert (model(x) - want).abs().max() <= 1e-6


def test_batch_norm_errors_and_flops():
    assert_error(spec("x: 'f32[B, 3, 4, 4, 4]'", "y = batch_norm(x)"), 6, 18,
                 "batch_norm: expected x of layout [B, C], [B, C, L] or [B, C, H, W], got f32[B, 3, 4, 4, 4] "
                 "(rank 5)")
    assert_error(spec("x: 'f32[B, T]'", "y = batch_norm(x)"), 6, 18,
                 "batch_norm: the number of channels (dimension 1 of x) must be a fixed size, but it is the "
                 "symbolic dimension T")
    assert_error(spec("x: 'f32[B, 3]'", "y = batch_norm(x, momentum=1.5)"), 6, 21,
                 "batch_norm: momentum must be in [0, 1], got 1.5")
    for b in (2, 7):
        assert flops_of(spec("x: 'f32[B, 3, 5]'", "y = batch_norm(x)"), "batch_norm", B=b) == 4 * b * 15
        assert flops_of(spec("x: 'f32[B, 3, 5]'", "y = batch_norm(x, affine=false)"), "batch_norm", B=b) == 2 * b * 15


# ---------------------------------------------------------------------------------------------
# pools, adaptive pooling, upsample
# ---------------------------------------------------------------------------------------------

POOLS = [  # (op, input shape, arguments in the spec, functional call)
    ("max_pool2d", "B, 3, 9, 8", "2", lambda x: F.max_pool2d(x, 2)),
    ("max_pool2d", "B, 3, 9, 8", "3, stride=1, padding=1", lambda x: F.max_pool2d(x, 3, stride=1, padding=1)),
    ("max_pool2d", "B, 3, 9, 8", "5, stride=1, padding=2", lambda x: F.max_pool2d(x, 5, stride=1, padding=2)),
    ("avg_pool2d", "B, 3, 9, 8", "[3, 2], stride=[2, 1], padding=[1, 0]",
     lambda x: F.avg_pool2d(x, (3, 2), stride=(2, 1), padding=(1, 0))),
    ("avg_pool2d", "B, 3, 9, 8", "2", lambda x: F.avg_pool2d(x, 2)),
    ("max_pool1d", "B, 4, 11", "3, stride=2", lambda x: F.max_pool1d(x, 3, stride=2)),
    ("avg_pool1d", "B, 4, 11", "4, padding=2", lambda x: F.avg_pool1d(x, 4, padding=2)),
]


@pytest.mark.parametrize("op,shape,args,fn", POOLS, ids=[f"{p[0]}({p[2]})" for p in POOLS])
def test_pools_match_functional(op, shape, args, fn):
    text = spec(f"x: 'f32[{shape}]'", f"y = {op}(x, {args})")
    model = load64(text)
    (x,) = inputs64(model)
    with torch.no_grad():
        close(model(x), fn(x))
    assert tuple(specc.check(text).outputs[0].example_shape) == tuple(fn(x).shape)


def test_pools_generated_code(tmp_path):
    text = spec("x: 'f32[B, 3, 8, 8]'", "a = max_pool2d(x, 2)\nb = avg_pool2d(a, 3, stride=1, padding=1)\n"
                                        "y = adaptive_avg_pool2d(b) + upsample(adaptive_avg_pool2d(b, 2), 2)")
    src = (specc.build(text, tmp_path / "out") / "model.py").read_text()
    assert "a = F.max_pool2d(x, 2)  # (B, 3, 4, 4)" in src
    assert "b = F.avg_pool2d(a, 3, stride=1, padding=1)  # (B, 3, 4, 4)" in src
    assert "F.adaptive_avg_pool2d(b, 1)" in src
    assert "F.interpolate(F.adaptive_avg_pool2d(b, 2), scale_factor=2, mode='nearest')" in src


def test_pools_over_symbolic_sizes():
    text = spec("x: 'f32[B, 4, 2 * T]'", "y = max_pool1d(x, 2)")
    assert str(specc.check(text).outputs[0].type) == "f32[B, 4, T]"
    model = load64(text)
    for t in (1, 5):
        (x,) = inputs64(model, T=t)
        close(model(x), F.max_pool1d(x, 2))
    assert_error(spec("x: 'f32[B, 4, T]'", "y = avg_pool1d(x, 2)"), 6, 21,
                 "avg_pool1d: dimension 2 of x f32[B, 4, T] is the symbolic size T; with stride 2 the output size "
                 "floor((T - 2) / 2) + 1 is not a polynomial in it: give dimension 2 a fixed size, or declare it as "
                 "a multiple of 2 (e.g. 2 * T2 in the input's type: the size is then 2 times a symbol)")


def test_pool_errors():
    assert_error(spec("x: 'f32[B, 3, 8, 8]'", "y = max_pool2d(x, 2, padding=2)"), 6, 24,
                 "max_pool2d: padding 2 is more than half the kernel 2")
    assert_error(spec("x: 'f32[B, 3, 8]'", "y = avg_pool2d(x, 2)"), 6, 18,
                 "avg_pool2d: expected x of layout [B, C, H, W] (rank 4), got f32[B, 3, 8] (rank 3)")
    assert_error(spec("x: 'f32[B, 3, 4]'", "y = max_pool1d(x, 6)"), 6, 21,
                 "max_pool1d: dimension 2 of x f32[B, 3, 4] is 4, smaller than the window of kernel 6 (6 wide): "
                 "the output would be empty")
    assert_error(spec("x: 'f32[B, 3, 4, 4]'", "y = adaptive_avg_pool2d(x, [2, 5])"), 6, 30,
                 "adaptive_avg_pool2d: size [2, 5] is larger than dimension 3 of x f32[B, 3, 4, 4] (4)")
    assert_error(spec("x: 'f32[B, 3, 4]'", "y = upsample(x, mode='bilinear')"), 6, 19,
                 "upsample: mode 'bilinear' needs x of layout [B, C, H, W], got f32[B, 3, 4]")
    assert_error(spec("x: 'f32[B, 3, 4]'", "y = upsample(x, mode='cubic')"), 6, 19,
                 "upsample(): argument 'mode' must be one of 'nearest', 'linear', 'bilinear', got 'cubic'")


@pytest.mark.parametrize("size", ["1", "[2, 3]", "3"])
def test_adaptive_avg_pool2d_matches_functional(size):
    text = spec("x: 'f32[B, 3, 7, 6]'", f"y = adaptive_avg_pool2d(x, {size})")
    model = load64(text)
    (x,) = inputs64(model)
    s = eval(size.replace("[", "(").replace("]", ")"))
    with torch.no_grad():
        close(model(x), F.adaptive_avg_pool2d(x, s))


UPSAMPLES = [
    ("B, 3, 5", "", dict(scale_factor=2, mode="nearest")),
    ("B, 3, 5", "scale=3, mode='linear'", dict(scale_factor=3, mode="linear")),
    ("B, 2, 4, 3", "", dict(scale_factor=2, mode="nearest")),
    ("B, 2, 4, 3", "scale=2, mode='bilinear'", dict(scale_factor=2, mode="bilinear")),
    ("B, 2, T, 3", "scale=4", dict(scale_factor=4, mode="nearest")),
]


@pytest.mark.parametrize("shape,args,kw", UPSAMPLES, ids=[f"{s}-{a}" for s, a, _ in UPSAMPLES])
def test_upsample_matches_functional(shape, args, kw):
    text = spec(f"x: 'f32[{shape}]'", f"y = upsample(x{', ' + args if args else ''})")
    model = load64(text)
    (x,) = inputs64(model, T=3)
    with torch.no_grad():
        close(model(x), F.interpolate(x, **kw))


def test_pool_and_upsample_flops():
    for b in (1, 4):
        assert flops_of(spec("x: 'f32[B, 3, 8, 6]'", "y = max_pool2d(x, 2)"), "max_pool2d", B=b) == b * 3 * 4 * 3 * 4
        assert flops_of(spec("x: 'f32[B, 3, 9]'", "y = avg_pool1d(x, 3, stride=1, padding=1)"), "avg_pool1d",
                        B=b) == b * 3 * 9 * 3
        assert flops_of(spec("x: 'f32[B, 3, 8, 6]'", "y = adaptive_avg_pool2d(x)"), "adaptive_avg_pool2d",
                        B=b) == b * 3 * 48 + b * 3
        assert flops_of(spec("x: 'f32[B, 3, 4, 5]'", "y = upsample(x, mode='bilinear')"), "upsample",
                        B=b) == 9 * b * 3 * 8 * 10
        assert "upsample" not in summarize(specc.compile(spec("x: 'f32[B, 3, 4]'", "y = upsample(x)")),
                                           {"B": b}).flops_by_op  # nearest: no arithmetic


def test_small_cnn_end_to_end():
    """Conv -> BN -> SiLU -> maxpool -> strided conv -> upsample + skip -> global pool, as in YOLO-style
    blocks, against the same computation written with torch.nn.functional."""
    text = spec("x: 'f32[B, 3, 12, 12]'", """
h = silu(batch_norm(conv2d(x, 8, 3, padding=1, bias=false)))
p = max_pool2d(h, 5, stride=1, padding=2)
d = conv2d(p, 8, 3, stride=2, padding=1)
u = upsample(d) + h
y = adaptive_avg_pool2d(u)
""")
    model = load64(text, opt_level=0)  # -O1 folds the batch norm into the conv (a pass with its own tests)
    sd = random_stats(model)
    (x,) = inputs64(model, B=3)
    h = F.silu(F.batch_norm(F.conv2d(x, sd["conv2d.weight"], padding=1), sd["batch_norm.running_mean"],
                            sd["batch_norm.running_var"], sd["batch_norm.weight"], sd["batch_norm.bias"]))
    p = F.max_pool2d(h, 5, stride=1, padding=2)
    d = F.conv2d(p, sd["d.weight"], sd["d.bias"], stride=2, padding=1)
    want = F.adaptive_avg_pool2d(F.interpolate(d, scale_factor=2) + h, 1)
    with torch.no_grad():
        close(model(x), want)
