"""specs/lsa_icl.yaml (SEEDS.md row 7): with the constructed weights W_K = W_Q = [[I, 0], [0, 0]],
W_V = [[0, 0], [W0, -I]], P = eta/N I loaded through the weights mechanism, one linear self-attention
layer equals one gradient-descent step on the in-context regression loss L(W) = 1/(2N) sum_i
|W x_i - y_i|^2 (von Oswald et al., Proposition 1).

The oracle is the gradient step itself, taken by autograd in float64: every token becomes
(x_j, y_j - dW x_j) with dW = -eta grad L(W0), and from W0 = 0 the prediction read from the query token
equals the stepped model's prediction (W0 + dW) x_test. The constructed weights are exact in float32
(eta/N is a power of two and W0 is drawn as float32 values), so the built model cast to float64 runs
the construction exactly, and the tolerance is float64 rounding: max abs error <= 1e-12 (measured
9e-16 on values of order 5, at -O0 and -O2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import specc

NAME = "lsa_icl"
TOL = 1e-12
DX, N, ETA = 4, 16, 0.5   # eta / N = 2**-5: exact in float32


def specc_spec() -> Path:
    return Path(__file__).resolve().parents[1] / "specs" / f"{NAME}.yaml"


def constructed(w0: torch.Tensor, eta: float = ETA, n: int = N) -> dict[str, torch.Tensor]:
    """The weights of Proposition 1, in the layout of linear(): y = e @ weight.T, i.e. weight = W."""
    d = w0.shape[1] + 1
    wk = torch.zeros(d, d)
    wk[:-1, :-1] = torch.eye(d - 1)
    wv = torch.zeros(d, d)
    wv[-1, :-1] = w0[0]
    wv[-1, -1] = -1.0
    return {"q.weight": wk.clone(), "k.weight": wk, "v.weight": wv, "p.weight": eta / n * torch.eye(d)}


def task(seed: int, batch: int = 3):
    """Context pairs (x_i, y_i = w x_i), a query x_test, and the tokens with the query's y entry 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N + 1, DX, generator=gen, dtype=torch.float64)
    w = torch.randn(batch, 1, DX, generator=gen, dtype=torch.float64)
    y = (x @ w.transpose(1, 2))  # [batch, N + 1, 1]
    y[:, N] = 0.0
    return x, y, torch.cat([x, y], dim=-1)


def gd_step(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """W0 - eta grad L(W0) per task, by autograd on the in-context loss over the N context pairs."""
    steps = []
    for b in range(x.shape[0]):
        w = w0.clone().requires_grad_(True)
        loss = ((x[b, :N] @ w.T - y[b, :N]) ** 2).sum() / (2 * N)
        (grad,) = torch.autograd.grad(loss, w)
        steps.append(w0 - eta * grad)
    return torch.stack(steps)  # [batch, 1, DX]


def expected_tokens(x, y, w0):
    dw = gd_step(x, y, w0) - w0
    return torch.cat([x, y - x @ dw.transpose(1, 2)], dim=-1)


def w0_f32(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, DX, generator=gen).double()  # float32 values, held in float64


def test_layer_equals_one_gradient_step_from_the_api_weights():
    for seed, w0 in ((0, torch.zeros(1, DX, dtype=torch.float64)), (1, w0_f32(7))):
        model = specc.load(specc_spec(), opt_level=0, weights=constructed(w0.float())).double()
        x, y, e = task(seed)
        with torch.no_grad():
            tokens, pred = model(e)
        want = expected_tokens(x, y, w0)
        assert (tokens - want).abs().max() <= TOL
        assert (tokens[:, :, :DX] == x).all()  # the x part passes through unchanged
        if not w0.any():  # from W0 = 0: the prediction is the one-step model's prediction on x_test
            w1 = gd_step(x, y, w0)
            assert (pred - (x[:, N] * w1[:, 0]).sum(-1)).abs().max() <= TOL


def test_cli_build_with_given_weights_runs_one_gradient_step(zoo, tmp_path):
    w0 = w0_f32(3)
    path = tmp_path / "constructed.safetensors"
    save_file(constructed(w0.float()), str(path))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "specc.cli", "build", str(specc_spec()), "-o", str(out), "-O0", "--weights",
           str(path), "--run", "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, model = zoo.load_dir(out)
    x, y, e = task(5)
    with torch.no_grad():
        tokens, _ = model.double()(e)
    assert (tokens - expected_tokens(x, y, w0)).abs().max() <= TOL


def test_other_sizes_and_optimised_builds_keep_the_step():
    """--set dx/n_ctx reshapes the layer; -O2 (which may merge linear maps) keeps the step to float rounding."""
    s = specc.check(specc_spec(), dx=2, n_ctx=8)
    assert [o.example_shape for o in s.outputs] == [(2, 9, 3), (2,)] and s.params == 4 * 3 * 3
    w0 = w0_f32(11)
    model = specc.load(specc_spec(), opt_level=2, weights=constructed(w0.float())).double()
    x, y, e = task(2)
    with torch.no_grad():
        tokens, _ = model(e)
    assert (tokens - expected_tokens(x, y, w0)).abs().max() <= TOL


def test_randomly_initialised_layer_is_not_a_gradient_step():
    """The check has teeth: the seeded (untrained) weights do not perform the step."""
    model = specc.load(specc_spec(), opt_level=0).double()
    x, y, e = task(0)
    with torch.no_grad():
        tokens, _ = model(e)
    assert (tokens - expected_tokens(x, y, torch.zeros(1, DX, dtype=torch.float64))).abs().max() > 1e-3


@pytest.mark.parametrize("bad, message", [("p.weight", "has shape")])
def test_wrong_weight_shape_is_a_user_error(bad, message):
    w = constructed(torch.zeros(1, DX))
    w[bad] = torch.zeros(2, 2)
    with pytest.raises(specc.SpecError) as err:
        specc.load(specc_spec(), weights=w)
    assert message in str(err.value)
