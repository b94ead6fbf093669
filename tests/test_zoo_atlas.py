"""specs/atlas.yaml (SEEDS.md row 19, ATLAS): a decoder whose token mixer is a memory trained inside the
forward pass by the Omega rule over a sliding window, on polynomial features of the keys: by default
the deep memory M(x) = W2 silu(W1 x) (per head, from learned initial weights), with memory=linear the
linear memory M x.

* With window 1, a linear memory, phi the identity and no gates (gamma = decay = 1), the model reduces
  exactly to the delta rule: it equals a hand-written float64 decoder whose mixer is the loop
  M_t = M_{t-1} - eta_t (M_{t-1} k_t - v_t) k_t^T, y_t = M_t q_t.
* The spec as written (window 4, the degree-2 polynomial feature map, learned eta, gamma and forget
  gate, the deep memory) and with memory=linear equals a hand-written float64 ATLAS decoder whose
  memory takes the window gradient in closed form, and each layer's memory output equals the Omega
  rule with the window loss differentiated by autograd (both weights of the deep memory, or M).
* The output at t does not depend on tokens after t; every parameter gets a gradient.
* The CLI checks, builds (-O1 and -O2), runs and trains it. (tvm-llvm: tests/test_tvm_equivalence.py;
  the Omega-rule kernel itself: tests/test_tvm_memory.py.)

Tolerances (float64): built module vs the hand-written references: max abs error <= 1e-10 on logits
of size ~1 (the same math in another order through two layers); causality exactly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import specc

NAME = "atlas"
REPO = Path(__file__).resolve().parents[1]
TOL = 1e-10
HEADS, D, HIDDEN = 4, 64, 16


def tokens(seed, b=2, t=16, vocab=5):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def model64(zoo, text=None, **overrides):
    """The built module in float64, its weights perturbed (so that no gate or bias sits at its initial value)."""
    model = specc.load(text or zoo.spec(NAME), opt_level=0, **overrides).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def phi(x):
    """L2-normalised rows, then [x, vec(x x^T) / sqrt(2)]."""
    x = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    return torch.cat([x, (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)], dim=-1)


def omega_loop(q, k, v, eta, gamma, alpha, window):
    """One memory (q, k [T, dk], v [T, dv]): M_t = alpha_t M_{t-1} - eta_t sum_{i in window} gamma_i
    (M_{t-1} k_i - v_i) k_i^T, y_t = M_t q_t."""
    m = torch.zeros(v.shape[-1], k.shape[-1], dtype=q.dtype)
    ys = []
    for t in range(q.shape[0]):
        grad = sum(gamma[i] * torch.outer(m @ k[i] - v[i], k[i]) for i in range(max(0, t - window + 1), t + 1))
        m = alpha[t] * m - eta[t] * grad
        ys.append(m @ q[t])
    return torch.stack(ys)


def deep_loop(q, k, v, eta, gamma, alpha, window, w1, w2):
    """One deep memory M(x) = W2 silu(W1 x) from W1_0 = w1 [hidden, dk], W2_0 = w2 [dv, hidden]: both weights
    take W_t = alpha_t W_{t-1} - eta_t grad_W, the window loss's gradient in closed form, y_t = M_t(q_t)."""
    ys = []
    for t in range(q.shape[0]):
        g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
        for i in range(max(0, t - window + 1), t + 1):
            z = w1 @ k[i]
            e = gamma[i] * (w2 @ F.silu(z) - v[i])
            g2 += torch.outer(e, F.silu(z))
            g1 += torch.outer((w2.T @ e) * (torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))), k[i])
        w1, w2 = alpha[t] * w1 - eta[t] * g1, alpha[t] * w2 - eta[t] * g2
        ys.append(w2 @ F.silu(w1 @ q[t]))
    return torch.stack(ys)


def delta_loop(q, k, v, eta):
    m = torch.zeros(v.shape[-1], k.shape[-1], dtype=q.dtype)
    ys = []
    for t in range(q.shape[0]):
        m = m - eta[t] * torch.outer(m @ k[t] - v[t], k[t])
        ys.append(m @ q[t])
    return torch.stack(ys)


def memory_ref(x, w, p, window, delta=False, memory="mlp", step_scale=0.125):
    """The memory block of one layer, written out: projections, heads, phi, the recurrence per (batch, head)."""
    b, t, _ = x.shape
    dh = D // HEADS
    heads = lambda z: z.reshape(b, t, HEADS, dh).transpose(1, 2)  # noqa: E731
    gate = lambda name: torch.sigmoid(F.linear(x, w[p + name + ".weight"], w[p + name + ".bias"])).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(x @ w[p + n + ".weight"].T) for n in "qkv")
    eta = gate("eta") * step_scale / window
    y = torch.empty(b, HEADS, t, dh, dtype=x.dtype)
    if delta:  # no feature map, no gamma, no forget gate
        for i in range(b):
            for h in range(HEADS):
                y[i, h] = delta_loop(q[i, h], k[i, h], v[i, h], eta[i, h])
    else:
        q, k, gamma, alpha = phi(q), phi(k), gate("gamma"), gate("alpha")
        for i in range(b):
            for h in range(HEADS):
                args = (q[i, h], k[i, h], v[i, h], eta[i, h], gamma[i, h], alpha[i, h], window)
                if memory == "mlp":  # each head from its own initial weights
                    y[i, h] = deep_loop(*args, w[p + "y.weight1"][h], w[p + "y.weight2"][h])
                else:
                    y[i, h] = omega_loop(*args)
    return F.linear(y.transpose(1, 2).reshape(b, t, D), w[p + "out.weight"], w[p + "out.bias"])


def reference(w, idx, window=4, layers=2, delta=False, memory="mlp"):
    ln = lambda z, n: F.layer_norm(z, (D,), w[n + ".weight"], w[n + ".bias"])  # noqa: E731
    h = w["tok.weight"][idx]
    for layer in range(layers):
        p = f"h.{layer}."
        h = h + memory_ref(ln(h, p + "layer_norm"), w, p + "mixer.", window, delta, memory)
        x = ln(h, p + "layer_norm_1")
        h = h + F.linear(F.gelu(F.linear(x, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                         w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return ln(h, "layer_norm") @ w["logits.weight"].T


def test_window_one_linear_memory_without_features_is_the_delta_rule(zoo):
    text = zoo.spec(NAME).read_text()
    plain = (text.replace("phi(heads_of(q)), phi(heads_of(k))", "heads_of(q), heads_of(k)")
             .replace("gamma=gate(gamma), decay=gate(alpha), ", ""))
    assert "phi(heads_of" not in plain and "decay=gate" not in plain  # the definition of phi stays, unused
    model, w = model64(zoo, plain, window=1, memory="linear")
    for seed in (0, 1):
        idx = tokens(seed)
        with torch.no_grad():
            got = model(idx)
        want = reference(w, idx, window=1, delta=True)
        assert want.abs().max() > 0.1
        assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_the_spec_equals_a_hand_written_atlas(zoo, memory):
    model, w = model64(zoo, memory=memory)
    assert ("h.0.mixer.y.weight1" in w) == (memory == "mlp")
    if memory == "mlp":
        assert w["h.1.mixer.y.weight1"].shape == (HEADS, HIDDEN, 16 + 256)
        assert w["h.1.mixer.y.weight2"].shape == (HEADS, 16, HIDDEN)
    for seed, t in ((2, 16), (3, 9)):
        idx = tokens(seed, t=t)
        with torch.no_grad():
            got = model(idx)
        want = reference(w, idx, memory=memory)
        assert got.shape == (2, t, 5) and got.dtype == torch.float64
        assert (got - want).abs().max().item() <= TOL
    # the window matters: the same weights with window 1 give other logits
    want = reference(w, tokens(2), memory=memory)
    assert (reference(w, tokens(2), window=1, memory=memory) - want).abs().max() > 1e-4
    if memory == "mlp":  # and so does the memory's kind (the linear one with the same other weights)
        assert (reference(w, tokens(2), memory="linear") - reference(w, tokens(2))).abs().max() > 1e-4


@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_each_memory_is_one_omega_step_on_its_window_by_autograd(zoo, monkeypatch, memory):
    """Each layer's memory output, from the inputs the built module gives it, against the Omega rule with
    the window loss 1/2 sum gamma_i ||M(k_i) - v_i||^2 differentiated by autograd: with respect to both
    weights of the deep memory M(x) = W2 silu(W1 x), or to the linear memory M."""
    out = zoo.build_api(NAME, memory=memory)
    module, _ = zoo.load_dir(out)
    model = module.load(out).double()
    calls = []
    real = module.omega_rule

    def spy(*args, **kwargs):
        y = real(*args, **kwargs)
        calls.append((args, kwargs, y))
        return y

    monkeypatch.setattr(module, "omega_rule", spy)
    with torch.no_grad():
        model(tokens(4, t=10))
    assert len(calls) == 2
    for (q, k, v, eta), kw, y in calls:
        assert kw["window"] == 4 and q.shape == (2, HEADS, 10, 16 + 256) and y.dtype == torch.float64
        assert ("w1" in kw) == (memory == "mlp") and kw.get("residual", True) is (memory == "linear")
        for b, h in ((0, 0), (1, 3)):
            if memory == "mlp":
                ws = [kw["w1"][h].detach().clone(), kw["w2"][h].detach().clone()]
                read = lambda ws, x: ws[1] @ F.silu(ws[0] @ x)  # noqa: E731
            else:
                ws = [torch.zeros(16, q.shape[-1], dtype=torch.float64)]
                read = lambda ws, x: ws[0] @ x  # noqa: E731
            for t in range(10):
                w0 = [x.clone().requires_grad_(True) for x in ws]
                with torch.enable_grad():
                    loss = sum(0.5 * kw["gamma"][b, h, i] * ((read(w0, k[b, h, i]) - v[b, h, i]) ** 2).sum()
                               for i in range(max(0, t - 3), t + 1))
                    grads = torch.autograd.grad(loss, w0)
                ws = [kw["decay"][b, h, t] * x - eta[b, h, t] * g for x, g in zip(ws, grads)]
                assert (y[b, h, t] - read(ws, q[b, h, t])).abs().max().item() <= 1e-12


def test_output_at_t_is_independent_of_later_tokens(zoo):
    model, _ = model64(zoo)
    idx = tokens(5)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 15):
            changed = idx.clone()
            changed[:, t:] = (changed[:, t:] + 1) % 5
            y = model(changed)
            assert torch.equal(y[:, :t], base[:, :t]), t
            assert (y[:, t:] - base[:, t:]).abs().max() > 1e-6


def test_every_parameter_gets_a_gradient(zoo):
    model, _ = model64(zoo)
    idx = tokens(6)
    F.cross_entropy(model(idx)[:, :-1].reshape(-1, 5), idx[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


# ---------------------------------------------------------------------------------------------
# the CLI: check, build, train
# ---------------------------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specc.cli", *args, "--no-color"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_checks_and_builds(zoo):
    r = cli("check", str(zoo.spec(NAME)))
    assert r.returncode == 0, r.stderr
    assert "atlas: ok" in r.stdout and "f32[B, T, 5]" in r.stdout and "automata (tokens, targets, mask)" in r.stdout
    s = specc.check(zoo.spec(NAME))
    dk, dv, hd, w = 272, 16, HIDDEN, 4  # the deep memory's FLOPs per step (compiler/ops_memory.py)
    per_step = w * (4 * hd * dk + 6 * dv * hd + 9 * hd + 2 * dv) + 5 * hd * dk + 5 * dv * hd + 4 * hd
    assert s.flops_by_op["omega_memory"] == 2 * 2 * HEADS * 16 * per_step
    assert s.params == specc.check(zoo.spec(NAME), memory="linear").params + 2 * HEADS * HIDDEN * (dk + dv)
    s = specc.check(zoo.spec(NAME), memory="linear")
    assert s.flops_by_op["omega_memory"] == 2 * 2 * HEADS * 16 * (4 * 4 * 272 * 16 + 2 * 4 * 16 + 5 * 272 * 16)
    r = cli("check", str(zoo.spec(NAME)), "--set", "memory=deep")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument 'memory' must be one of 'linear', 'mlp', got 'deep'" in r.stderr
    r = cli("check", str(zoo.spec(NAME)), "--set", "window=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "omega_memory: window must be from 1 to 4096 tokens, got 0" in r.stderr
    out = zoo.build_cli(NAME, run=True)
    module, model = zoo.load_dir(out)
    assert ("y = omega_rule(phi, phi_1, heads_of_2, gate * 0.125 / 4.0, gamma=gate_1, decay=gate_2, window=4, "
            "w1=self.y.weight1, w2=self.y.weight2, residual=False)") in (out / "model.py").read_text()
    w = {k: v.double() for k, v in zoo.weights(out).items()}
    idx = module.example_inputs()[0]
    with torch.no_grad():
        got = model(idx)
    assert got.dtype == torch.float32
    assert (got.double() - reference(w, idx)).abs().max().item() <= 1e-4
    o2 = specc.load(zoo.spec(NAME), opt_level=2).double()
    o2.load_state_dict({k: v for k, v in w.items()}, strict=False)
    with torch.no_grad():
        assert (o2(idx) - reference(w, idx)).abs().max().item() <= TOL


def test_a_short_training_run_lowers_the_loss(zoo, tmp_path):
    run_dir = tmp_path / "run"
    r = cli("train", str(zoo.spec(NAME)), "-o", str(run_dir), "--set", "d_model=32", "--set", "layers=1",
            "--set", "train.steps=12", "--set", "train.eval.every=12", "--set", "train.checkpoint.every=12",
            "--set", "train.batch=16", "--set", "train.schedule=warmup(2)",
            "--set", "train.data=automata(states=4, alphabet=4, length=16, n=400)")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if m.get("split") == "val"]
    assert [m["step"] for m in evals] == [0, 12]
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert evals[-1]["loss"] < 0.95 * evals[0]["loss"]  # about 1.77 -> 1.6 (chance over 5 tokens: 1.61)
