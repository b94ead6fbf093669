"""Parameters follow the float dtype of the values a layer is applied to: f64 inputs give f64 weights.

A layer's float parameters (weights, biases, norm gains, batch-norm running statistics) take the
dtype of its first float input; integer buffers (num_batches_tracked) and the parameters of a layer
whose input is not float (an embedding of integer ids) keep theirs. The passes that make new
parameters (linear-chain merging, q/k/v fusion, batch-norm folding, lookup folding) keep the dtype
of those they replace.

Checks, per layer on f64 inputs: the PyTorch module built from the f64 spec (at -O0, -O1 and -O2)
against the module of the same spec in f32 converted with .double(), at -O0 (seeded weights are
drawn in float32 and cast, so both hold the same values), and the tvm-llvm model against the f64
PyTorch module: max |difference| <= 1e-12.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specc
from specc import SpecError
from specc.backends.pytorch.build import artifacts, import_model_module, load_in_memory
from specc.backends.pytorch.weights import init_weights, materialise, merge_given
from specc.compiler.passes import PassContext, optimize

from opcheck import spec_text

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12

L64 = """specc: 1
name: l64
dims:
  B: 2
inputs:
  x: f64[B, 4]
graph: |
  y = linear(x, 3)
outputs:
  y: f64[B, 3]
"""

#: name -> (inputs, graph) of one small spec per layer, on f64 values
LAYERS = {
    "linear": ("x: 'f64[B, T, 6]'", "y = linear(x, 3)"),
    "mlp": ("x: 'f64[B, T, 6]'", "y = mlp(x, 12, out=4)"),
    "conv_bn": ("x: 'f64[B, 3, 6, 6]'", "y = relu(batch_norm(conv2d(x, 4, 3, padding=1)))"),
    "layer_norm": ("x: 'f64[B, T, 6]'", "y = layer_norm(x)"),
    "attention": ("x: 'f64[B, T, 8]'", "y = attention(x, heads=2, causal=true)"),
    "lstm": ("x: 'f64[B, T, 6]'", "y = lstm(x, 5)"),
    "lstm_bidirectional": ("x: 'f64[B, T, 6]'", "y = lstm(x, 5, layers=2, bidirectional=true)"),
    "gru_bidirectional": ("x: 'f64[B, T, 6]'", "y = gru(x, 5, layers=2, bidirectional=true)"),
}


def layer_spec(name: str, dtype: str = "f64") -> str:
    inputs, graph = LAYERS[name]
    return spec_text(inputs.replace("f64", dtype), graph)


def float_params(graph) -> dict[str, str]:
    """Full parameter name -> dtype, of every parameter of `graph`."""
    return {".".join(n.path + (p.name,)): p.dtype for _, n in graph.nodes() for p in n.params}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float64, (a.shape, a.dtype, b.shape, b.dtype)
    return (a - b).abs().max().item()


def noisy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Seeded noise on the float tensors, so that unit gains and zero biases or means hide no mapping."""
    gen = torch.Generator().manual_seed(1)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in sorted(weights.items())}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_params_are_f64_and_torch_agrees(name):
    text = layer_spec(name)
    graph = specc.compile(text)
    dtypes = float_params(graph)
    assert dtypes and all(d == ("i64" if k.endswith("num_batches_tracked") else "f64") for k, d in dtypes.items()), \
        dtypes
    base = noisy(init_weights(graph))
    assert all(v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float64)
               for k, v in base.items())
    # the same layer in f32, with the same values, run in float64
    text32 = layer_spec(name, "f32")
    graph32 = specc.compile(text32)
    w32 = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
    reference = load_in_memory(artifacts(graph32, text32, "r.yaml", weights=w32, ctx=PassContext(opt_level=0)))
    reference = reference.double().eval()
    inputs = reference.example_inputs(seed=3)
    inputs = tuple(x.double() for x in inputs)
    with torch.no_grad():
        want = reference(*inputs)
    # the f64 spec's weights: the same values (the noise above was added in float64)
    base = {k: v.float().double() if v.is_floating_point() else v for k, v in base.items()}
    for level in (0, 1, 2):
        model = load_in_memory(artifacts(graph, text, "m.yaml", weights=base, ctx=PassContext(opt_level=level)))
        assert all(p.dtype == torch.float64 for p in model.parameters())
        with torch.no_grad():
            got = model(*inputs)
        assert max_err(got, want) <= TOL, (name, level)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_tvm_llvm_agrees_in_float64(name):
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    text = layer_spec(name)
    graph = specc.compile(text)
    base = noisy(init_weights(graph))
    model = load_in_memory(artifacts(graph, text, "m.yaml", weights=base, ctx=PassContext(opt_level=0))).eval()
    optimised, _ = optimize(graph, PassContext(opt_level=2))
    runner = compile_graph(optimised, "llvm", weights=materialise(optimised, base))
    for seed, dims in enumerate([{}, {"B": 3}]):
        inputs = model.example_inputs(seed=seed, **dims)
        with torch.no_grad():
            want = model(*inputs)
        got = runner(*inputs)
        assert got.dtype == torch.float64
        assert max_err(got, want) <= TOL, (name, dims)


def test_norms_without_affine_parameters_in_tvm():
    """Relax's fused layer_norm takes float32 and float16 only: the f64 norms are computed from means."""
    pytest.importorskip("tvm")
    from specc.backends.tvm.build import compile_graph

    text = spec_text("x: 'f64[B, T, 6]'", "a = layer_norm(x, affine=false)\nb = rms_norm(x, affine=false)\n"
                     "c = rms_norm(x)", "a b c")
    graph = specc.compile(text)
    weights = noisy(init_weights(graph))
    x = specc.load(text).example_inputs()[0]
    runner = compile_graph(graph, "llvm", weights=weights)
    a, b, c = runner(x)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    assert max_err(a, (x - mean) / torch.sqrt(var + 1e-5)) <= TOL
    rms = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert max_err(b, rms) <= TOL
    assert max_err(c, rms * weights["c.weight"]) <= TOL


def test_linear_hand_computation():
    model = specc.load(L64)
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w, b = model.y.weight.detach(), model.y.bias.detach()
    assert w.dtype == b.dtype == torch.float64
    with torch.no_grad():
        assert max_err(model(x), x @ w.T + b) <= TOL


def test_generated_module_makes_f64_parameters_itself(tmp_path):
    """Model() (without load) already holds parameters of the right dtypes: torch's modules are made
    with dtype=, the generated helper classes converted."""
    text = spec_text("x: 'f64[B, T, 8]', img: 'f64[B, 3, 5, 5]', ids: 'i64[B, T] in range(7)'",
                     "h = attention(layer_norm(x), heads=2) + mlp(x, 16)\ny = lstm(h, 4)\n"
                     "c = batch_norm(conv2d(img, 4, 3))\ne = embedding(ids, 7, 4)", "y c e")
    files = artifacts(specc.compile(text), text, "m.yaml", ctx=PassContext(opt_level=0))
    source = files["model.py"].decode()
    assert "nn.LayerNorm(8, eps=1e-05, dtype=torch.float64)" in source
    assert "nn.LSTM(8, 4, batch_first=True, dtype=torch.float64)" in source
    assert "MultiHeadAttention(8, heads=2).to(torch.float64)" in source
    assert "nn.Embedding(7, 4)\n" in source
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    module = import_model_module(tmp_path)
    model = module.Model()
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes.pop("e.weight") == torch.float32
    assert dtypes.pop("c.num_batches_tracked") == torch.int64
    assert set(dtypes.values()) == {torch.float64}, dtypes
    loaded = module.load(tmp_path)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()}
    out = loaded(*module.example_inputs())
    assert [t.dtype for t in out] == [torch.float64, torch.float64, torch.float32]


def test_non_float_inputs_and_f32_layers_keep_f32_params():
    """An embedding of integer ids keeps f32 weights, and an f32 layer in an f64 spec stays f32."""
    text = spec_text("x: 'f64[B, T, 4]', z: 'f32[B, T, 4]', ids: 'i64[B, T] in range(7)'",
                     "e = embedding(ids, 7, 4)\na = linear(z, 4)\nb = linear(x, 4)\nP = parameter(4)\n"
                     "y = b + cast(a + e * P, f64)")
    dtypes = float_params(specc.compile(text))
    assert dtypes == {"e.weight": "f32", "a.weight": "f32", "a.bias": "f32", "b.weight": "f64", "b.bias": "f64",
                      "P.weight": "f32"}
    model = specc.load(text)
    assert model(*model.example_inputs()).dtype == torch.float64


def test_other_float_dtypes():
    """f16 and bf16 layers hold f16 and bf16 weights in the same way."""
    for dtype, torch_dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        text = layer_spec("mlp", dtype)
        assert set(float_params(specc.compile(text)).values()) == {dtype}
        model = specc.load(text)
        assert model(*model.example_inputs()).dtype == torch_dtype


def test_o2_keeps_f64_params():
    """Merged linear chains, fused q/k/v and batch norm folded into a conv keep the dtype."""
    text = spec_text("x: 'f64[B, T, 8]', img: 'f64[B, 3, 6, 6]'",
                     "y = linear(linear(x, 16, bias=false), 4)\na = attention(x, heads=2)\n"
                     "c = batch_norm(conv2d(img, 4, 3, padding=1))", "y a c")
    graph = specc.compile(text)
    optimised, records = optimize(graph, PassContext(opt_level=2))
    modified = {r.name for r in records if r.modified}
    assert {"merge_linear_chains", "fuse_qkv", "fold_batch_norm"} <= modified, modified
    dtypes = float_params(optimised)
    assert "a.qkv.weight" in dtypes and not any("running" in k for k in dtypes), dtypes
    assert set(dtypes.values()) == {"f64"}, dtypes
    base = noisy(init_weights(graph))
    state = materialise(optimised, base)
    assert all(v.dtype == torch.float64 for v in state.values())
    reference = load_in_memory(artifacts(graph, text, "m.yaml", weights=base, ctx=PassContext(opt_level=0)))
    model = load_in_memory(artifacts(graph, text, "m.yaml", weights=base, ctx=PassContext(opt_level=2)))
    inputs = reference.example_inputs()
    with torch.no_grad():
        for got, want in zip(model.eval()(*inputs), reference.eval()(*inputs)):
            assert max_err(got, want) <= TOL


def test_folded_lookup_table_keeps_its_dtype():
    text = spec_text("ids: 'i64[B, T] in range(7)'", "y = layer_norm(linear(embedding(ids, 7, 4), 6))")
    optimised, records = optimize(specc.compile(text), PassContext(opt_level=2))
    assert any(r.name == "fold_lookups" and r.modified for r in records)
    assert set(float_params(optimised).values()) == {"f32"}


def test_given_weights_are_cast_to_f64():
    graph = specc.compile(L64)
    state = merge_given(graph, {"y.weight": torch.ones(3, 4, dtype=torch.float32)})
    assert state["y.weight"].dtype == state["y.bias"].dtype == torch.float64
    model = specc.load(L64, weights={"y.weight": torch.ones(3, 4)})
    assert model.y.weight.dtype == torch.float64 and float(model.y.weight.detach().sum()) == 12.0


def test_share_between_dtypes_is_a_located_error():
    text = spec_text("x: 'f64[B, T, 4]', z: 'f32[B, T, 4]'", "a = linear(z, 4)\nb = linear(x, 4, share=a)", "a b")
    with pytest.raises(SpecError) as info:
        specc.check(text)
    (d,) = info.value.diagnostics
    assert (d.span.line, d.span.col) == (7, 20)
    assert "share=: this linear would have parameters [weight f64[4, 4], bias f64[4]]" in d.message
    assert any("dtype" in n for n in d.notes)


def test_tie_between_dtypes_is_a_located_error():
    text = spec_text("x: 'f64[B, T, 4]', ids: 'i64[B, T] in range(5)'",
                     "tok = embedding(ids, 5, 4)\ny = linear(x, 5, bias=false, tie=tok)", "y tok")
    with pytest.raises(SpecError) as info:
        specc.check(text)
    (d,) = info.value.diagnostics
    assert (d.span.line, d.span.col) == (7, 32)
    assert d.message == ("linear: cannot tie this layer's weight f64[5, 4] to tok.weight, of dtype f32: its float "
                         "parameters take the dtype of its input, and tied parameters share one storage")
    specc.check(text.replace("linear(x,", "linear(cast(x, f32),"))  # the head on f32 values ties as before


def test_init_from_another_float_dtype_copies_and_casts():
    """init_from= gives storage of its own: an f64 layer may start as a copy of an f32 one."""
    text = spec_text("x: 'f64[B, T, 4]', z: 'f32[B, T, 4]'", "a = linear(z, 4)\nb = linear(x, 4, init_from=a)",
                     "a b")
    graph = specc.compile(text)
    weights = init_weights(graph)
    assert weights["b.weight"].dtype == torch.float64
    assert torch.equal(weights["b.weight"], weights["a.weight"].double())
    assert torch.equal(weights["b.bias"], weights["a.bias"].double())
    model = specc.load(text)
    a, b = model(*model.example_inputs())
    assert (a.dtype, b.dtype) == (torch.float32, torch.float64)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specc.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.mark.parametrize("target", ["torch", "tvm-llvm"])
def test_cli_verify_l64(tmp_path, target):
    if target != "torch":
        pytest.importorskip("tvm")
    path = tmp_path / "l64.yaml"
    path.write_text(L64)
    r = cli("verify", str(path), "--examples", "10", "--target", target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: 10 runs, no mismatch" in r.stdout


def test_attention_kv_of_another_dtype_is_a_located_error():
    """Keys and values go through projections of x's dtype."""
    text = spec_text("x: 'f64[B, T, 8]', m: 'f32[B, 3, 8]'", "y = attention(x, heads=2, kv=m)")
    with pytest.raises(SpecError) as info:
        specc.check(text)
    (d,) = info.value.diagnostics
    assert (d.span.line, d.span.col, d.message) == (6, 29, "attention: kv must have x's dtype f64, got f32[B, 3, 8]")
