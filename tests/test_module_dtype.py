"""Generated PyTorch modules follow their own float dtype: the f32 values a model creates itself (one_hot,
arange, ones/zeros, casts, where between literals, integers times float literals, true division of
integers) take the dtype that `.double()`, `.float()`, `.half()` and `.to(dtype)` give the module, with or
without parameters, and without touching torch's default dtype (which these tests check is left alone).

Tolerances: a float64 copy of a zoo model against its float32 run: max abs error <= 1e-5 * max(1, max |y|)
(float32 rounding through a few layers; the zoo's worst is about 4e-7 of the output's scale); values that
are counts or one-hot products (ngram_head's counts, transformer_program's one-hot residual stream) and
the small specs' created values are compared exactly; converting back with `.float()` gives the float32
run's outputs exactly (the same weights, rounded to float64 and back, and the same code).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import specc
from conftest import SPECS
from opcheck import spec_text

#: Sizes for the specs whose defaults are larger than a quick test wants.
SMALL = {"gelan": {"size": 32}}
ZOO = sorted(p.stem for p in SPECS.glob("*.yaml"))
REL_TOL = 1e-5


@pytest.fixture(autouse=True)
def default_dtype_untouched():
    assert torch.get_default_dtype() == torch.float32
    yield
    assert torch.get_default_dtype() == torch.float32, "the test changed torch's default dtype"


@pytest.fixture(scope="module")
def built(zoo):
    """name -> (generated module, loaded model, build folder), each spec built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out = zoo.build_api(name, **SMALL.get(name, {}))
            module, model = zoo.load_dir(out)
            cache[name] = module, model, out
        return cache[name]

    return get


def run(model, inputs, dtype=None):
    if dtype is not None:
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", ZOO)
def test_double_model_computes_in_float64(built, name):
    module, model, out = built(name)
    inputs = module.example_inputs()
    want = run(model, inputs)
    m64 = copy.deepcopy(model).double()
    got = run(m64, inputs, torch.float64)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (i, g.shape, w.shape)
        if not w.is_floating_point():
            assert g.dtype == w.dtype and torch.equal(g, w), f"output {i}"
            continue
        assert w.dtype == torch.float32, f"output {i} of the float32 model is {w.dtype}"
        assert g.dtype == torch.float64, f"output {i} of the float64 model is {g.dtype}"
        err = (g - w.double()).abs().max().item() if g.numel() else 0.0
        bound = REL_TOL * max(1.0, g.abs().max().item() if g.numel() else 0.0)
        assert err <= bound, f"output {i}: max abs error {err:.3g} > {bound:.3g}"
    back = run(m64.float(), inputs)
    for i, (b, w) in enumerate(zip(back, want)):
        assert b.dtype == w.dtype and torch.equal(b, w), f"output {i} after .float()"


@pytest.mark.parametrize("name", ZOO)
def test_dtype_reference_is_not_stored(built, name):
    """The dtype buffers are not in the state dict (the weights file and load() are unchanged) and
    load() leaves none of them on the meta device (so .to(device) works)."""
    module, model, out = built(name)
    stored = set(load_file(str(out / "weights.safetensors")))
    assert set(model.state_dict()) - set(module.TIED) == stored
    assert not any("dtype_ref" in k for k in model.state_dict())
    for key, buffer in model.named_buffers():
        assert not buffer.is_meta, key
        if key.split(".")[-1].startswith("dtype_ref"):
            assert buffer.dtype == torch.float32 and buffer.numel() == 0, key


def test_ngram_head_counts_are_exact_in_float64(built):
    """No parameters at all: the module's float dtype comes from its dtype buffer alone."""
    module, model, _ = built("ngram_head")
    assert not list(model.parameters())
    inputs = module.example_inputs(B=3, T=24)
    counts32, probs32 = run(model, inputs)
    m64 = copy.deepcopy(model).double()
    counts64, probs64 = run(m64, inputs)
    assert counts64.dtype == probs64.dtype == torch.float64
    assert counts32.sum() > 0 and torch.equal(counts64, counts32.double())
    assert (probs64 - probs32.double()).abs().max() <= 1e-6
    # the float64 division, not a float32 one converted
    total = counts64.sum(-1, keepdim=True)
    assert torch.equal(probs64, counts64 / torch.where(total == 0, 1.0, total).double())
    counts16, _ = run(copy.deepcopy(model).half(), inputs)
    assert counts16.dtype == torch.float16 and torch.equal(counts16.double(), counts64)
    counts32b, probs32b = run(m64.float(), inputs)
    assert counts32b.dtype == probs32b.dtype == torch.float32 and torch.equal(probs32b, probs32)


def test_transformer_program_one_hot_stream_is_exact_in_float64(built):
    module, model, _ = built("transformer_program")
    inputs = module.example_inputs(B=3, T=10)

    def readout_input(m, dtype=None):
        seen = []
        handle = m.logits.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        try:
            logits = run(m, inputs, dtype)[0]
        finally:
            handle.remove()
        return seen[0], logits

    x32, logits32 = readout_input(model)
    x64, logits64 = readout_input(copy.deepcopy(model).double(), torch.float64)
    assert x64.dtype == logits64.dtype == torch.float64
    stream32, stream64 = x32[..., :-1], x64[..., :-1]  # one-hot variables; the last column is the mean
    assert set(stream64.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(stream64, stream32.double())
    assert (x64[..., -1] - x32[..., -1].double()).abs().max() <= 1e-6  # a mean of 0/1 values
    assert (logits64 - logits32.double()).abs().max() <= REL_TOL * max(1.0, logits64.abs().max().item())


CREATED = spec_text(
    "ids: 'i64[B, T] in range(6)', x: 'f32[B, T]'",
    """
    a = ids * 0.1
    b = ids / 3
    c = where(ids > 2, 0.1, 0.0)
    d = where(ids > 2, 1.0, -inf)
    e = where(ids > 2, ids, 0.5)
    f = cast(ids, f32) + arange(T, dtype=f32) + ones(T, dtype=f32)
    g = one_hot(ids, 6)
    h = cast(ids, f64) / 3
    y = x + cast(ids > 3, f32)
    """, outputs="a b c d e f g h y")


def created_reference(ids: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The spec above computed with torch directly in `dtype`."""
    t = ids.shape[1]
    one, point_one = torch.tensor(1.0, dtype=dtype), torch.tensor(0.1, dtype=dtype)
    return (ids.to(dtype) * 0.1, ids.to(dtype) / 3,
            torch.where(ids > 2, point_one, 0.0), torch.where(ids > 2, one, float("-inf")),
            torch.where(ids > 2, ids.to(dtype), 0.5),
            ids.to(dtype) + torch.arange(t, dtype=dtype) + torch.ones(t, dtype=dtype),
            torch.nn.functional.one_hot(ids, 6).to(dtype), ids.double() / 3, x.to(dtype) + (ids > 3).to(dtype))


@pytest.mark.parametrize("opt_level", [0, 1])
def test_created_values_take_the_module_dtype_exactly(opt_level):
    model = specc.load(CREATED, opt_level=opt_level)
    ids, x = model.example_inputs(B=3, T=7)
    for dtype in (torch.float32, torch.float64, torch.float32):  # float, double, and back
        model = model.to(dtype)
        got = run(model, (ids, x), dtype)
        want = created_reference(ids, x, dtype)
        for name, g, w in zip("abcdefghy", got, want):
            assert g.dtype == w.dtype, (name, dtype, g.dtype, w.dtype)
            assert torch.equal(g, w), (name, dtype)
    assert got[7].dtype == torch.float64  # declared f64: float64 in a float32 model too


def test_generated_source_reads_the_dtype_buffer(tmp_path):
    src = (specc.build(CREATED, tmp_path / "o") / "model.py").read_text()
    assert "get_default_dtype" not in src
    assert 'self.register_buffer("dtype_ref", torch.empty(0), persistent=False)' in src
    assert "F.one_hot(ids, 6).to(self.dtype_ref.dtype)" in src
    assert "torch.arange(T, dtype=self.dtype_ref.dtype, device=ids.device)" in src
    assert 'd = torch.where(gt, 1.0, float("-inf")).to(self.dtype_ref.dtype)' in src  # exact in float32
    assert "c = torch.where(gt, torch.tensor(0.1, dtype=self.dtype_ref.dtype, device=ids.device), 0.0)" in src
    assert "a = ids.to(self.dtype_ref.dtype) * 0.1" in src
    assert "ids.to(torch.float64)" in src


def test_a_layer_named_like_the_buffer_keeps_its_name(tmp_path):
    text = spec_text("ids: 'i64[B, T] in range(6)'", "dtype_ref = linear(one_hot(ids, 6), 4)\ny = dtype_ref * 2.0")
    out = specc.build(text, tmp_path / "o")
    assert 'self.register_buffer("dtype_ref_", torch.empty(0), persistent=False)' in (out / "model.py").read_text()
    model = specc.load(text)
    assert isinstance(model.dtype_ref, torch.nn.Linear)
    ids = model.example_inputs()[0]
    y32 = run(model, (ids,))[0]
    y64 = run(model.double(), (ids,))[0]
    assert y64.dtype == torch.float64 and (y64 - y32.double()).abs().max() <= 1e-6
