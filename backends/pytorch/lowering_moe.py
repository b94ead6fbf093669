"""PyTorch lowerings of the mixture-of-experts operators (compiler/ops_moe.py)."""

from __future__ import annotations

from .lowering import Ctx, Expr, InTypes, Lowering, call, lit


def _moe_init(c: Ctx, ins: InTypes) -> str:
    d = ins[0].shape[-1]
    args = [str(d), str(c.a("hidden")), f"experts={c.a('experts')}"]
    if c.a("out") and c.a("out") != d:
        args.append(f"out={c.a('out')}")
    if c.a("act") != "gelu":
        args.append(f"act={lit(c.a('act'))}")
    if not c.a("bias"):
        args.append("bias=False")
    return f"RoutedMLP({', '.join(args)})"


LOWERINGS: dict[str, Lowering] = {
    "moe_mlp": Lowering(lambda c, xs: call(f"{c.module}({xs[0].text}, {xs[1].text})"), _moe_init, ("RoutedMLP",)),
}

HELPERS: dict[str, str] = {
    "RoutedMLP": '''
class ExpertLinear(nn.Module):
    """One linear map per expert: weight (experts, out, in), bias (experts, out)."""

    def __init__(self, experts: int, dim: int, out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out, dim))
        self.bias = nn.Parameter(torch.empty(experts, out)) if bias else None

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.weight[expert], None if self.bias is None else self.bias[expert])


class RoutedMLP(nn.Module):
    """A mixture of MLP experts (linear -> activation -> linear) with given routing: the token x[..., :]
    goes through expert route[...] only."""

    ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "softplus": F.softplus, "leaky_relu": F.leaky_relu, "elu": F.elu, "hardswish": F.hardswish,
            "mish": F.mish, "identity": lambda x: x}

    def __init__(self, dim: int, hidden: int, experts: int, out: int | None = None, act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        self.experts, self.out_dim, self.act = experts, out or dim, act
        self.fc1 = ExpertLinear(experts, dim, hidden, bias)
        self.fc2 = ExpertLinear(experts, hidden, out or dim, bias)

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        tokens, route = x.reshape(-1, x.shape[-1]), route.reshape(-1)  # (N, d), (N,)
        y = tokens.new_zeros(tokens.shape[0], self.out_dim)
        for e in range(self.experts):
            rows = (route == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                y[rows] = self.fc2(self.ACTS[self.act](self.fc1(tokens[rows], e)), e)
        return y.reshape(*x.shape[:-1], self.out_dim)
''',
}
