"""LoRA as a training transform on an existing spec: freeze the model, give named linear layers a
trained low-rank update, merge it into their weights for deploy.

The update of a layer with weight W [out, in] is `alpha / r * B @ A` with A [r, in] (small random
values) and B [out, r] (zeros, so training starts from the spec's model). It is added by a forward
hook on the built module's `nn.Linear`, and A and B are registered on that module as `lora_A` and
`lora_B`, so every other parameter keeps its name (checkpoints hold both). `merged` folds the
updates into the weights: the built RUN/model/ is the spec's own architecture with W + alpha/r B A,
no adapter left.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from specc.compiler.ir import Graph

#: Operators whose 2-D `*weight` parameters are the weights of torch `nn.Linear` layers.
LINEAR_OPS = frozenset({"linear", "attention", "mlp"})


def linear_layers(graph: Graph) -> list[str]:
    """Paths of the linear layers of `graph` (parameter paths without '.weight'), tied ones left out."""
    out = []
    for _, node in graph.nodes():
        if node.op not in LINEAR_OPS:
            continue
        for p in node.params:
            if p.name.endswith("weight") and len(p.shape) == 2 and p.tied_to is None:
                out.append(".".join(node.path + (p.name,))[:-len(".weight")])
    return out


def _hook(module: torch.nn.Module, inputs, output):
    x = inputs[0]
    return output + module.lora_scale * F.linear(F.linear(x, module.lora_A), module.lora_B)


def inject(model: torch.nn.Module, layers: list[str], rank: int, alpha: float, seed: int) -> list[str]:
    """Freeze `model` and add the trained update to each layer of `layers`; the new parameters' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    names = []
    for path in layers:
        module = model.get_submodule(path)
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(f"'{path}' is a {type(module).__name__}, not a linear layer")
        out_features, in_features = module.weight.shape
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=gen)
        module.register_parameter("lora_A", torch.nn.Parameter(a.to(module.weight)))
        module.register_parameter("lora_B", torch.nn.Parameter(torch.zeros(out_features, rank).to(module.weight)))
        module.lora_scale = alpha / rank
        module.register_forward_hook(_hook)
        names += [f"{path}.lora_A", f"{path}.lora_B"]
    return names


#: The metadata key of a checkpoint's model.safetensors that holds its LoRA layers' scales (alpha / r) as
#: JSON, so that the file alone gives the merged weights (`merge_factors`: `--weights` of any target).
SCALES_KEY = "specc_lora_scales"


def scales(model: torch.nn.Module, names: list[str]) -> dict[str, float]:
    """The scale of each LoRA layer among the stored tensor `names` (those ending in .lora_A)."""
    paths = [n[:-len(".lora_A")] for n in names if n.endswith(".lora_A")]
    return {p: float(model.get_submodule(p).lora_scale) for p in paths}


def merge_factors(tensors: dict[str, torch.Tensor], layer_scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A LoRA run's stored tensors with each layer's update folded into its weight (W + scale * B @ A, in
    float64) and the factors left out: the spec's own parameters. Raises ValueError when the factors and
    the scales do not fit each other."""
    out = {k: v for k, v in tensors.items() if not k.endswith((".lora_A", ".lora_B"))}
    factored = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".lora_A", ".lora_B"))})
    for path in factored:
        missing = [k for k in (f"{path}.lora_A", f"{path}.lora_B", f"{path}.weight") if k not in tensors]
        if missing or path not in layer_scales:
            raise ValueError(f"the LoRA layer '{path}' lacks {', '.join(missing) or 'its scale'}")
        a, b, w = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"], tensors[f"{path}.weight"]
        if a.ndim != 2 or b.ndim != 2 or w.ndim != 2 or b.shape[1] != a.shape[0] \
                or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"the LoRA layer '{path}': B {list(b.shape)} @ A {list(a.shape)} does not fit its "
                             f"weight {list(w.shape)}")
        out[f"{path}.weight"] = (w.double() + layer_scales[path] * (b.double() @ a.double())).to(w.dtype)
    return out


def merged(model: torch.nn.Module, layers: list[str], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` (of the spec's parameters) with each layer's update folded into its weight (in float64):
    `merge_factors` of the model's factors, on the weights' device."""
    factors = {}
    for path in layers:
        module, device = model.get_submodule(path), weights[f"{path}.weight"].device
        factors[f"{path}.lora_A"] = module.lora_A.detach().to(device)
        factors[f"{path}.lora_B"] = module.lora_B.detach().to(device)
    return merge_factors({**weights, **factors}, scales(model, [f"{p}.lora_A" for p in layers]))
