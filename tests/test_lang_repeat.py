"""repeat(n, block, x, ...)'s options: stack=true gives each carried value of every step stacked along a new
leading axis (the values of the unrolled steps, exactly); share=true makes every step reuse the parameters
of step 0 (one set of parameters in `specc check`, in the IR, in the built module and its weights; frozen=,
freeze: and initialisers follow step 0's); misuse is a located error.

Tolerances: stacked values are compared exactly with the steps of an unstacked repeat of the same weights
(the same operations); a shared repeat against a hand-written float64 loop over one set of weights: max abs
error <= 1e-12 (-O0: the same operations; -O2 may regroup a few products); the gradient of a shared weight
against the sum of the per-step gradients of the untied model, float32: 1e-5 absolute (sums in other orders).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import specc
from opcheck import assert_error
from specc.compiler.printer import print_graph


def ir(text: str) -> str:
    """The unoptimised IR of a spec, as `specc ir -O0` prints it (without source spans)."""
    return print_graph(specc.compile(text), show_span=False)

TOL = 1e-12
D, N = 6, 3
f64 = torch.float64

#: a block with two carried values, a nested block and a layer norm; `share=` and `stack=` from params
SPEC = """\
specc: 1
name: r
params: {{d: {d}, n: {n}, tied: {tied}, stacked: {stacked}}}
dims: {{B: 2}}
inputs:
  x: f32[B, d]
blocks:
  mix(a): |
    return tanh(linear(a, d))
  step(h, c): |
    u = mix(h) + linear(c, d{extra})
    h = layer_norm(u + h)
    return h, c + relu(h)
graph: |
  {targets} = repeat(n, step, x, x * 0.5{options})
outputs:
{outputs}"""


def spec(tied: bool = False, stacked: bool = False, options: str = ", share=tied, stack=stacked",
         extra: str = ", bias=false") -> str:
    targets = "hs, cs" if stacked else "h, c"
    outputs = "".join(f"  {t.strip()}:\n" for t in targets.split(","))
    return SPEC.format(d=D, n=N, tied=str(tied).lower(), stacked=str(stacked).lower(), targets=targets,
                       options=options, outputs=outputs, extra=extra)


def per_step() -> int:
    return (D * D + D) + D * D + 2 * D  # mix's linear, the bias-free linear, the layer norm


def step_ref(sd, prefix, h, c):
    """One step of `step`, written out with the parameters under `prefix`."""
    def w(name):
        return sd[f"{prefix}.{name}"]
    u = torch.tanh(F.linear(h, w("mix.linear.weight"), w("mix.linear.bias"))) + F.linear(c, w("linear.weight"))
    h = F.layer_norm(u + h, (D,), w("h.weight"), w("h.bias"))  # the layer norm, named after its value
    return h, c + torch.relu(h)


# -- stack= ---------------------------------------------------------------------------------------

def test_stacked_values_equal_the_unrolled_steps():
    """hs[i], cs[i] of repeat(n, ..., stack=true) are exactly h, c of repeat(i + 1, ...) with the same weights."""
    text = spec(stacked=True)
    assert [str(o.type) for o in specc.check(text).outputs] == [f"f32[{N}, B, {D}]", f"f32[{N}, B, {D}]"]
    model = specc.load(text, opt_level=0)
    weights = dict(model.state_dict())
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs, cs = model(x)
    assert hs.shape == cs.shape == (N, 2, D)
    for k in range(1, N + 1):
        short = specc.load(spec(), opt_level=0, n=k,
                           weights={n: v for n, v in weights.items() if int(n.split(".")[1]) < k})
        with torch.no_grad():
            h, c = short(x)
        assert torch.equal(hs[k - 1], h) and torch.equal(cs[k - 1], c), k
    assert not torch.equal(hs[0], hs[1])  # the steps differ
    one = specc.load(text, opt_level=0, n=1)
    with torch.no_grad():
        assert one(x)[0].shape == (1, 2, D)


def test_stack_at_every_opt_level_and_in_the_ir(tmp_path):
    text = spec(stacked=True)
    text_ir = ir(text)
    assert f"f32[{N}, B, {D}] = concat(" in text_ir and text_ir.count("= unsqueeze(") == 2 * N
    x = torch.randn(2, D, dtype=f64)
    with torch.no_grad():
        want = specc.load(text, opt_level=0).double()(x)
        got = specc.load(text, opt_level=2).double()(x)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOL
    source = (specc.build(text, tmp_path / "o", opt_level=0) / "model.py").read_text()
    assert "torch.cat([" in source and ".unsqueeze(0)" in source


# -- share= ---------------------------------------------------------------------------------------

def loop_ref(sd, x, tied: bool):
    """The repeat as a loop: every step with step 0's weights (tied) or with its own."""
    h, c = x, x * 0.5
    for i in range(N):
        h, c = step_ref(sd, "step.0" if tied else f"step.{i}", h, c)
    return h, c


def test_shared_steps_equal_a_loop_over_one_set_of_weights():
    for opt_level in (0, 2):
        model = specc.load(spec(tied=True), opt_level=opt_level).double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=f64))
        sd = dict(model.state_dict())
        x = torch.randn(4, D, dtype=f64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            h, c = model(x)
            want_h, want_c = loop_ref(sd, x, tied=True)
            assert (h - want_h).abs().max() <= TOL and (c - want_c).abs().max() <= TOL, opt_level
            # teeth: the untied model with these weights in step 0 only is another function
            untied = specc.load(spec(), opt_level=0).double()
            untied.load_state_dict({k: v for k, v in sd.items() if k.startswith("step.0.")}, strict=False)
            assert (untied(x)[0] - h).abs().max() > 1e-3


def test_one_set_of_parameters_in_check_ir_module_and_weights(tmp_path):
    assert specc.check(spec()).params == N * per_step()
    assert specc.check(spec(tied=True)).params == per_step()
    text_ir = ir(spec(tied=True))
    assert f"@step.{N - 1}.mix.linear {{weight: f32[{D}, {D}] = @step.0.mix.linear.weight" in text_ir
    model = specc.load(spec(tied=True))
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 5 and all(n.startswith("step.0.") for n in names)
    assert sum(p.numel() for p in model.parameters()) == per_step()
    assert model.step[2].h.weight is model.step[0].h.weight
    out = specc.build(spec(tied=True), tmp_path / "o")
    from safetensors import safe_open
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(names)
    source = (out / "model.py").read_text()
    assert "self.step[2].linear.weight = self.step[0].linear.weight" in source  # tied in tie_weights()
    # the gradient of the shared weights is the sum of each step's gradient
    x = torch.randn(3, D)
    untied = specc.load(spec(), opt_level=0)
    untied.load_state_dict({k.replace("step.0.", f"step.{i}."): v for k, v in model.state_dict().items()
                            if k.startswith("step.0.") for i in range(N)})
    model.train(), untied.train()
    model(x)[0].sum().backward()
    untied(x)[0].sum().backward()
    for name, p in model.named_parameters():
        steps = sum(untied.get_parameter(name.replace("step.0.", f"step.{i}.")).grad for i in range(N))
        assert torch.allclose(p.grad, steps, atol=1e-5), name


def test_shared_steps_follow_frozen_freeze_and_initialisers_of_step_0():
    text = spec(tied=True, extra=", bias=false, frozen=true, init=zeros")
    s = specc.check(text)
    assert s.params == per_step() and s.trainable_params == per_step() - D * D
    model = specc.load(text)
    assert not model.step[0].linear.weight.requires_grad and model.step[2].linear.weight is model.step[0].linear.weight
    assert not model.step[0].linear.weight.any()
    # freeze: a pattern that names every later step freezes the storage they share, that of step 0; one
    # naming some steps only would choose steps that one tensor cannot follow: an error at the pattern, as
    # in a recipe's freeze: (tests/test_train_tied_names.py)
    frozen = spec(tied=True) + "freeze:\n  - step.[12].mix.*\n"
    s = specc.check(frozen)
    assert s.trainable_params == per_step() - (D * D + D)
    m = specc.load(frozen)
    assert not m.step[0].mix.linear.weight.requires_grad and m.step[0].h.weight.requires_grad
    some = spec(tied=True) + "freeze:\n  - step.2.mix.*\n"
    assert_error(some, some.splitlines().index("  - step.2.mix.*") + 1, 5,
                 "freeze: 'step.2.mix.*' matches step.2.mix.linear.weight, tied to step.0.mix.linear.weight: the "
                 "same tensor as step.1.mix.linear.weight, so freezing it freezes every one of them, not only the "
                 "name the pattern matches (1 more tied parameter alike)")
    # share= inside the block: the layer shares the one of its own step, and so, tied, that of step 0
    inner = spec(tied=True).replace("u = mix(h) + linear(c, d, bias=false)",
                                    "v = linear(c, d, bias=false)\n    u = linear(v, d, bias=false, share=v)")
    assert specc.check(inner).params == D * D + 2 * D
    assert specc.check(inner.replace("tied: true", "tied: false")).params == N * (D * D + 2 * D)


NESTED = """\
specc: 1
name: nest
params: {{d: 4, outer_tied: {a}, inner_tied: {b}}}
dims: {{B: 2}}
inputs:
  x: f32[B, d]
blocks:
  cell(h): |
    return tanh(linear(h, d))
  layer(h): |
    return repeat(3, cell, h, share=inner_tied) + h
graph: |
  y = repeat(2, layer, x, share=outer_tied)
outputs:
  y:
"""


def test_nested_repeats_share_at_each_level():
    cell = 4 * 4 + 4
    counts = {(a, b): specc.check(NESTED.format(a=str(a).lower(), b=str(b).lower())).params
              for a in (False, True) for b in (False, True)}
    assert counts == {(False, False): 6 * cell, (False, True): 2 * cell, (True, False): 3 * cell, (True, True): cell}
    model = specc.load(NESTED.format(a="true", b="false")).double()
    x = torch.randn(2, 4, dtype=f64)
    sd = model.state_dict()
    h = x
    for _ in range(2):
        inner = h
        for j in range(3):
            inner = torch.tanh(F.linear(inner, sd[f"y.0.cell.{j}.linear.weight"], sd[f"y.0.cell.{j}.linear.bias"]))
        h = inner + h
    with torch.no_grad():
        assert (model(x) - h).abs().max() <= TOL


# -- errors ---------------------------------------------------------------------------------------

ERRORS = """\
specc: 1
name: e
params: {{d: 4}}
dims: {{B: 2}}
inputs:
  x: f32[B, 3]
blocks:
  step(h): |
    return tanh(linear(h, d))
  grow(h): |
    return concat([h, h], dim=1)
  opt(h, stack): |
    return h
graph: |
  {line}
outputs:
  y: f32[B, 4]
"""


def test_misuse_is_a_located_error():
    def err(line, col, message, graph):
        assert_error(ERRORS.format(line=graph), line, col, message)

    err(15, 26, "repeat(..., share=true): step 1 has a linear 'y.1.linear' with parameters [weight f32[4, 4], "
        "bias f32[4]], but step 0 has a linear with parameters [weight f32[4, 3], bias f32[4]] at 'y.0.linear'; "
        "shared layers need the same op and parameter shapes and dtypes",
        "y = repeat(2, step, x, share=true)")
    err(15, 7, "repeat(..., stack=true): block 'grow' returns value 1 as f32[B, 6] at step 0 but as f32[B, 12] at "
        "step 1; stacked values need one type at every step", "y = repeat(2, grow, x, stack=true)")
    err(15, 14, "repeat(..., stack=true) needs at least one step: zero steps stack to nothing",
        "y = repeat(0, step, x, stack=true)")
    err(15, 32, "repeat: share= must be true or false (or a value of an earlier repeat), got the integer 1",
        "y = repeat(2, step, x, share=1)")
    err(15, 32, "repeat: stack= must be true or false, got the string 'yes'", 'y = repeat(2, step, x, stack="yes")')
    err(15, 25, "repeat: 'stack=' is repeat's own option, so it cannot pass block 'opt' its argument 'stack'",
        "y = repeat(2, opt, x, stack=true)")
    # a keyword given twice, an option or one for the block: an error, not the last one silently winning
    err(15, 38, "argument 'share' is given twice", "y = repeat(2, step, x, share=true, share=false)")
    err(15, 38, "argument 'stack' is given twice", "y = repeat(2, step, x, stack=true, stack=false)")
    text = ERRORS.format(line="y = repeat(2, step, x, g=x, g=x * 2)").replace("step(h): |", "step(h, g): |")
    assert_error(text, 15, 31, "argument 'g' is given twice")
    # an error inside a stacked block (here a repeat of itself) is reported once, not again as a value
    # that cannot be stacked
    text = ERRORS.format(line="y, z = repeat(2, pair, x, x, stack=true)").replace(
        "blocks:\n", "blocks:\n  pair(a, b): |\n    a, b = repeat(1, pair, a, b)\n    return a, b\n")
    with pytest.raises(specc.SpecError) as e:
        specc.compile(text)
    assert [d.message for d in e.value.diagnostics] == ["block 'pair' calls itself (through pair -> pair)"]


def test_options_off_change_nothing():
    """share=false, stack=false are the plain repeat: the same IR as without the options."""
    assert ir(spec()) == ir(spec(options=""))


#: two different blocks whose layers `ffn` (and `norm`) match by name; `extra` only in the second
ACROSS = """\
specc: 1
name: a
params: {{d: 5, n: 3}}
dims: {{B: 2}}
inputs:
  x: f32[B, d]
blocks:
  plain(h): |
    ffn = linear(h, d)
    norm = layer_norm(relu(ffn) + h)
    return norm
  extra(h, z): |
    ffn = linear(h, d)
    norm = layer_norm(relu(ffn) + h)
    more = linear(z, d, bias=false)
    return norm + more
  other(h): |
    ffn = layer_norm(h)
    return ffn
  step2(h): |
    return tanh(linear(h, d))
graph: |
  g = repeat(n, plain, x)
  {line}
outputs:
  y: f32[B, d]
"""


def test_share_another_repeat_step_by_step():
    """repeat(..., share=g): step i reuses the layers of step i of the repeat that computed g, matched by
    their path inside the step; a layer g's steps lack (`more`) is the step's own."""
    text = ACROSS.format(line="y = repeat(n, extra, x, z=g, share=g)")
    text_ir = ir(text)
    for i in range(N):
        assert f"@y.{i}.ffn {{weight: f32[5, 5] = @g.{i}.ffn.weight, bias: f32[5] = @g.{i}.ffn.bias}}" in text_ir
        assert f"@y.{i}.norm {{weight: f32[5] = @g.{i}.norm.weight" in text_ir
        assert f"@y.{i}.more {{weight: f32[5, 5]}}" in text_ir
    per_g = 5 * 5 + 5 + 2 * 5
    assert specc.check(text).params == N * per_g + N * 5 * 5
    model = specc.load(text, opt_level=0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=f64))
    w = dict(model.state_dict())
    x = torch.randn(4, 5, dtype=f64, generator=torch.Generator().manual_seed(2))

    def plain(h, i):
        ffn = h @ w[f"g.{i}.ffn.weight"].T + w[f"g.{i}.ffn.bias"]
        return F.layer_norm(torch.relu(ffn) + h, (5,), w[f"g.{i}.norm.weight"], w[f"g.{i}.norm.bias"])

    g = x
    for i in range(N):
        g = plain(g, i)
    h = x
    for i in range(N):
        h = plain(h, i) + g @ w[f"y.{i}.more.weight"].T
    for opt_level in (0, 2):
        got = specc.load(text, opt_level=opt_level).double()
        got.load_state_dict(w, strict=False)
        with torch.no_grad():
            assert (got(x) - h).abs().max() <= TOL, opt_level


def test_share_another_repeat_misuse_is_located():
    def err(line, col, message, graph):
        assert_error(ACROSS.format(line=graph), line, col, message)

    err(24, 27, "repeat(..., share=v): v must be a value computed inside an earlier repeat of this scope (its "
        "result, as `g = repeat(n, block, x)` binds it, stacked or not), whose layers this repeat's steps then reuse "
        "step by step",
        "y = repeat(n, plain, x, share=x)")
    err(24, 27, "repeat(..., share=g): 'g' ran 3 steps and this repeat runs 2; step i reuses the layers of step "
        "i, so the counts must agree", "y = repeat(2, plain, x, share=g)")
    err(24, 27, "repeat(..., share=g): step 0 has a layer_norm 'y.0.ffn' with parameters [weight f32[5], bias "
        "f32[5]], but step 0 of 'g' has a linear with parameters [weight f32[5, 5], bias f32[5]] at 'g.0.ffn'; "
        "shared layers need the same op and parameter shapes and dtypes", "y = repeat(n, other, x, share=g)")
    err(24, 27, "repeat(..., share=g): no layer of block 'step2' matches a layer of the repeat 'g' (layers match "
        "by their path inside the step, e.g. 'attention' or 'ffn'), so nothing would be shared",
        "y = repeat(n, step2, x, share=g)")


NESTED_HEAD = "specc: 1\nname: s\nparams: {d: 4}\ndims: {B: 2}\ninputs:\n  x: f32[B, d]\n"


def test_nested_shared_repeats_of_both_kinds():
    """share=true inside the steps of a share=g repeat ties its own steps (the layer g's steps lack), and
    share=g inside the steps of a share=true repeat matches g even where the outer repeat decides the tie:
    every layer reaches one storage per equivalence class (20 parameters per linear(4, 4))."""
    inner_true = NESTED_HEAD + """blocks:
  q(h): |
    fc = linear(h, d)
    return tanh(fc)
  sb(h): |
    extra = linear(h, d)
    return relu(extra)
  p(h): |
    fc = linear(h, d)
    h = tanh(fc)
    return repeat(2, sb, h, share=true)
graph: |
  g = repeat(2, q, x)
  y = repeat(2, p, x, share=g)
outputs:
  y:
"""
    assert specc.check(inner_true).params == 2 * 20 + 2 * 20  # g's two fc; one sb per step of y
    text_ir = ir(inner_true)
    assert "@y.1.fc {weight: f32[4, 4] = @g.1.fc.weight" in text_ir
    assert "@y.1.sb.1.extra {weight: f32[4, 4] = @y.1.sb.0.extra.weight" in text_ir
    inner_g = NESTED_HEAD + """blocks:
  step(h): |
    fc = linear(h, d)
    return tanh(fc)
  pair(h): |
    g = repeat(2, step, h)
    return repeat(2, step, g, share=g)
graph: |
  y = repeat(3, pair, x, share=true)
outputs:
  y:
"""
    assert specc.check(inner_g).params == 2 * 20  # pair's g once; its shared repeat and the outer steps reuse it
    assert specc.check(inner_g.replace("share=true", "share=false")).params == 3 * 2 * 20
    text_ir = ir(inner_g)
    assert "@y.2.step.1.fc {weight: f32[4, 4] = @y.0.g.1.fc.weight" in text_ir
    assert "@y.0.step.1.fc {weight: f32[4, 4] = @y.0.g.1.fc.weight" in text_ir


def test_share_a_stacked_repeat():
    """share= takes a stack=true repeat's result, or a step picked out of it, as it takes a plain result."""
    for line in ("gs = repeat(n, plain, x, stack=true)\n  y = repeat(n, extra, x, z=gs[-1], share=gs)",
                 "gs = repeat(n, plain, x, stack=true)\n  y = repeat(n, extra, x, z=gs[0], share=gs[-1])"):
        text = ACROSS.replace("  g = repeat(n, plain, x)\n", "").format(line=line)
        assert "@y.2.ffn {weight: f32[5, 5] = @gs.2.ffn.weight" in ir(text), line
    one = ACROSS.replace("  g = repeat(n, plain, x)\n", "").replace("n: 3", "n: 1").format(
        line="gs = repeat(n, plain, x, stack=true)\n  y = repeat(n, extra, x, z=gs[0], share=gs[0])")
    assert "@y.0.ffn {weight: f32[5, 5] = @gs.0.ffn.weight" in ir(one)  # one step: the stack is an unsqueeze


def test_share_an_index_of_a_plain_repeat_is_located():
    """g = repeat(...) binds the last step's value: g[0] indexes its batch axis, not a step, so share=g[0]
    (or another view of g) is an error that says to write share=g, not a silent share=g."""
    for graph, what in (("y = repeat(n, plain, x, share=g[0])", "an index"),
                        ("y = repeat(n, plain, x, share=g[:, 1:])", "an index"),
                        ("y = repeat(n, plain, x, share=unsqueeze(g, 0))", "an unsqueeze")):
        assert_error(ACROSS.format(line=graph), 24, 27,
                     f"repeat(..., share=v): v is {what} of 'g', which is the last step's value of a repeat; {what} "
                     f"of it picks no step (only the result of a repeat(..., stack=true) is indexed by step)")
