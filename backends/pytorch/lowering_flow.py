"""PyTorch lowerings of the optical-flow operators (compiler/ops_flow.py).

warp, splat and correlation read `backward_warp(x, flow)`, `forward_splat(x, flow)` and
`local_correlation(f1, f2, radius)` in generated code; the functions are helpers written into model.py,
so the module stays standalone. warp and splat share `bilinear_taps`, so splat (a scatter-add through
the taps) is the adjoint of warp (a gather through the same taps) up to float rounding of the sums.
Every float they create takes the dtype of the flow, so a float64 module computes in float64.
"""

from __future__ import annotations

from .lowering import Ctx, Expr, Lowering, call, num


def _warp(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"backward_warp({xs[0].text}, {xs[1].text})")


def _splat(c: Ctx, xs: list[Expr]) -> Expr:
    if c.a("mode") == "average":
        return call(f"forward_splat({xs[0].text}, {xs[1].text}, average=True, eps={num(c.a('eps'))})")
    return call(f"forward_splat({xs[0].text}, {xs[1].text})")


def _correlation(c: Ctx, xs: list[Expr]) -> Expr:
    return call(f"local_correlation({xs[0].text}, {xs[1].text}, {c.a('radius')})")


LOWERINGS: dict[str, Lowering] = {
    "warp": Lowering(_warp, helpers=("bilinear_taps", "backward_warp")),
    "splat": Lowering(_splat, helpers=("bilinear_taps", "forward_splat")),
    "correlation": Lowering(_correlation, helpers=("local_correlation",)),
}

HELPERS: dict[str, str] = {
    "bilinear_taps": '''
def bilinear_taps(flow: torch.Tensor):
    """The four bilinear taps of every pixel (i, j) of flow [B, 2, H, W] (pixels; channel 0 along W,
    channel 1 along H): the integer pixels around (i + flow[:, 1], j + flow[:, 0]), each as (flat index
    into H * W, weight), both [B, H * W]; a tap outside the image has weight 0 (and index 0)."""
    b, _, h, w = flow.shape
    px = torch.arange(w, dtype=flow.dtype, device=flow.device).view(1, 1, w) + flow[:, 0]  # (B, H, W)
    py = torch.arange(h, dtype=flow.dtype, device=flow.device).view(1, h, 1) + flow[:, 1]
    x0, y0 = torch.floor(px), torch.floor(py)
    fx, fy = px - x0, py - y0
    taps = []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            weight = torch.where(inside, wy * wx, torch.zeros_like(wx))
            index = torch.where(inside, yi * w + xi, torch.zeros_like(xi)).long()
            taps.append((index.reshape(b, h * w), weight.reshape(b, h * w)))
    return taps
''',
    "backward_warp": '''
def backward_warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] sampled bilinearly at each pixel plus its flow [B, 2, H, W] (zeros outside): torch's
    grid_sample with align_corners=True, padding_mode='zeros', on the grid in pixels."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for index, weight in bilinear_taps(flow):
        out = out + torch.gather(flat, 2, index.unsqueeze(1).expand(b, c, h * w)) * weight.unsqueeze(1)
    return out.view(b, c, h, w)
''',
    "forward_splat": '''
def forward_splat(x: torch.Tensor, flow: torch.Tensor, average: bool = False, eps: float = 1e-7) -> torch.Tensor:
    """Forward splatting: each pixel of x [B, C, H, W] added, bilinearly weighted, to the four pixels around
    its position plus its flow [B, 2, H, W] (what lands outside is dropped): the adjoint of backward_warp.
    average=True divides by the splatted weights plus eps (the average splatting of softmax splatting)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    norm = torch.zeros_like(flat[:, :1])
    for index, weight in bilinear_taps(flow):
        out = out.scatter_add(2, index.unsqueeze(1).expand(b, c, h * w), flat * weight.unsqueeze(1))
        if average:
            norm = norm.scatter_add(2, index.unsqueeze(1), weight.unsqueeze(1))
    if average:
        out = out / (norm + eps)
    return out.view(b, c, h, w)
''',
    "local_correlation": '''
def local_correlation(f1: torch.Tensor, f2: torch.Tensor, radius: int) -> torch.Tensor:
    """[B, (2r + 1)^2, H, W]: channel (dy + r) (2r + 1) + (dx + r) holds the dot products over channels of
    f1 [B, C, H, W] with f2 shifted by (dy, dx), f2 zero outside the image."""
    h, w = f1.shape[-2:]
    padded = F.pad(f2, (radius, radius, radius, radius))
    size = 2 * radius + 1
    return torch.stack([(f1 * padded[:, :, dy:dy + h, dx:dx + w]).sum(dim=1)
                        for dy in range(size) for dx in range(size)], dim=1)
''',
}
