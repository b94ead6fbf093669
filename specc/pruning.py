"""Structured pruning under a FLOP budget, after OPTIN ("The Need for Speed: Pruning Transformers with One
Recipe", Khaki and Plataniotis, ICLR 2024; SEEDS.md row 13): `specc prune SPEC --flops 0.6 -o OUT`.

    report = specc.prune("specs/gpt.yaml", "out/gpt-pruned", flops=0.6)   # also writes the build
    report.layers[0].kept, report.flops_after / report.flops_before

1. Importance. Each attention head and each MLP hidden neuron is masked alone (its slice of the layer's
   hidden activations zeroed before the output projection, fc2 for an mlp) in the unoptimised model,
   run in float64 on a calibration batch. Its importance is the distortion this causes in the features
   of the layers after it: the squared error of the output of every later attention and mlp layer,
   and of the model's float outputs, each divided by that feature's squared norm on the unmasked model
   (so every later feature weighs the same), summed.
2. Ranking. All heads and neurons of all layers are ranked together by importance per FLOP (the FLOPs
   that removing the unit saves, from the compiler's count at the example dimensions), and the least
   important are removed until the model's FLOPs (as `specc check` counts them) are within
   budget * the unpruned model's. Every layer keeps one head (neuron) at least.
3. Rewrite. compiler/passes/prune.py removes them physically (smaller projections, `head_dim=` on the
   attention), the weights derived from the unpruned ones; then the build is the usual -O pipeline.
   No retraining.

Where this departs from the paper: OPTIN's trajectory measure weighs the later layers' embedding
distortion with its own normalisation and also prunes ViT tokens and CNN channels; here the later
features are the outputs of the later attention / mlp layers and the model's outputs, equally weighted
after normalisation by their norms; the measure is computed exactly, each unit masked alone as in
the paper (several masked copies of the batch share a forward pass when the model treats samples
independently), not approximated by gradients; the FLOP budget applies at one set of sizes, the spec's
example dimensions unless `at=` (`--at T=128`) names others (attention's score FLOPs grow with T squared,
the projections' with T, so the fraction a pruned model saves depends on the sizes); and whole layers are
never removed. Measured on specs/gpt.yaml trained by its recipe (exact match 0.9997): 0.9 of the FLOPs
keeps 0.9987, 0.8 keeps 0.992, 0.6 falls to 0.10 (the paper's 2% at 0.6 is for BERT on GLUE).

Calibration (`calib=`): "data": samples of the spec's train: data set (its training split, a seeded
choice of `samples` of them); "example": the spec's example inputs for seeds seed .. seed+3; or a
.npz / .safetensors file holding one tensor per model input, samples along the first axis (the first
`samples` are used). The default is "data" when the spec has a train: section, else "example".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from specc.compiler.diagnostics import Diagnostic, Span, SpecError
from specc.compiler.ir import DTYPES, Graph
from specc.compiler.passes import PassContext
from specc.compiler.passes.prune import Layer, PruneError, prunable_layers, prune_structure
from specc.compiler.summary import summarize

#: How many example batches `calib="example"` runs (seeds seed, seed + 1, ...).
EXAMPLE_BATCHES = 4

CRITERION = ("OPTIN: distortion of the later attention/mlp outputs and the model outputs (relative squared "
             "error, equally weighted) when the unit alone is masked; ranked globally by importance per FLOP")


@dataclass(frozen=True)
class LayerReport:
    path: str
    kind: str  # "heads" or "neurons"
    before: int
    kept: tuple[int, ...]
    importance: tuple[float, ...]  # per unit, in unit order
    reason: str | None = None  # why the layer was left whole (not a candidate)

    @property
    def after(self) -> int:
        return len(self.kept)

    @property
    def removed(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.before) if i not in set(self.kept))

    def to_json(self) -> dict[str, Any]:
        out = {"layer": self.path, "kind": self.kind, "before": self.before, "after": self.after,
               "removed": list(self.removed)}
        if self.reason:
            out["left_whole"] = self.reason
        return out


@dataclass(frozen=True)
class PruneReport:
    name: str
    budget: float
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    calibration: str
    layers: tuple[LayerReport, ...]
    sizes: dict[str, int]  # the dimensions the FLOPs are counted at
    graph: Graph = field(repr=False)  # the pruned, unoptimised graph
    out: Path | None = None

    @property
    def keep(self) -> dict[str, list[int]]:
        return {layer.path: list(layer.kept) for layer in self.layers}

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "flops": [self.flops_before, self.flops_after],
                "fraction": self.flops_after / self.flops_before if self.flops_before else 1.0,
                "sizes": dict(self.sizes),
                "parameters": [self.params_before, self.params_after], "calibration": self.calibration,
                "criterion": CRITERION, "layers": [layer.to_json() for layer in self.layers]}


def check_budget(budget: Any, where: Span) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise SpecError(Diagnostic(where, f"the FLOP budget must be a fraction of the model's FLOPs in (0, 1], "
                                          f"e.g. 0.6, got {budget!r}"))
    return float(budget)


def check_sizes(graph: Graph, at: Mapping[str, Any] | None, where: Span) -> dict[str, int]:
    """The dimensions to count FLOPs at: the spec's example sizes, those named in `at` replaced. Each
    name must be a symbolic dimension of the spec and its size within the spec's bounds."""
    from specc.dsl.diagnostics import did_you_mean

    sizes = graph.example_bindings()
    for name, size in (at or {}).items():
        if name not in graph.dims:
            known = ", ".join(graph.dims) or "none"
            raise SpecError(Diagnostic(where, f"'{name}' is not a symbolic dimension of {graph.name} (its "
                                              f"dimensions: {known}){did_you_mean(name, list(graph.dims))}"))
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SpecError(Diagnostic(where, f"{name}: a size must be a positive integer, got {size!r}"))
        _, lo, hi = graph.dims[name]
        if size < lo or (hi is not None and size > hi):
            raise SpecError(Diagnostic(where, f"{name}={size} is outside the sizes {graph.name} accepts "
                                              f"({lo} to {hi if hi is not None else 'any'})"))
        sizes[name] = size
    for nid, axis, d, value in graph.nonpositive_dims(sizes)[:1]:
        node = graph.node(nid)
        at = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise SpecError(Diagnostic(where, f"at {at} dimension {axis} of the output of the {node.op} at {node.span}, "
                                          f"{d}, is {value}: the model does not run at these sizes"))
    return sizes


def prune(path_or_text, out: str | Path | None = None, *, flops: float, calib: str | Path | None = None,
          at: Mapping[str, int] | None = None, samples: int = 64, seed: int = 0, weights: Mapping[str, Any] | None = None, opt_level: int = 1,
          allow_imports: Iterable[str] = (), overrides: dict[str, Any] | None = None,
          **more_overrides: Any) -> PruneReport:
    """Prune a spec's attention heads and MLP neurons to `flops` (a fraction) of its FLOPs and, with
    `out`, write the pruned build there (model.py, weights.safetensors, manifest.json with a "prune"
    entry). calib: "data", "example" or a file (see the module doc); at: {dimension: size} to count the
    FLOPs at instead of the spec's example sizes (e.g. {"T": 128}); weights: {name: tensor} of the
    spec's parameters (a trained model), as for specc.load. Raises SpecError on a user error."""
    from specc.api import _front, given_weights

    src, graph = _front(path_or_text, {**(overrides or {}), **more_overrides}, allow_imports=allow_imports)
    budget = check_budget(flops, Span("<flops>", 0, 0))
    base = given_weights(graph, weights)
    return run(src, graph, budget, base=base, calib=calib, samples=samples, seed=seed, opt_level=opt_level,
               out=out, at=at)


def run(src, graph: Graph, budget: float, *, base=None, calib: str | Path | None = None, samples: int = 64,
        seed: int = 0, opt_level: int = 1, out: str | Path | None = None, at: Mapping[str, int] | None = None,
        budget_span: Span | None = None, calib_span: Span | None = None, at_span: Span | None = None) -> PruneReport:
    """The whole command on an elaborated spec: importance, ranking, rewrite, and (with `out`) the build."""
    from specc.backends.pytorch.build import artifacts, check_memory, write_atomic
    from specc.backends.pytorch.weights import init_weights

    budget_span = budget_span or Span("<flops>", 0, 0)
    calib_span = calib_span or Span("<calib>", 0, 0)
    budget = check_budget(budget, budget_span)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SpecError(Diagnostic(calib_span, f"the calibration sample count must be a positive integer, "
                                               f"got {samples!r}"))
    sizes = check_sizes(graph, at, at_span or Span("<at>", 0, 0))
    layers = prunable_layers(graph, sizes)
    candidates = [layer for layer in layers if layer.reason is None]
    if not candidates:
        where = src.doc.key_span(("graph",))
        if not layers:
            message = f"prune: {graph.name} has no attention or mlp layer (heads and hidden neurons are what it removes)"
        else:
            message = (f"prune: none of the attention and mlp layers of {graph.name} can be pruned: "
                       + "; ".join(f"'{layer.path}': {layer.reason}" for layer in layers))
        raise SpecError(Diagnostic(where, message), {src.file: src.text})
    before = summarize(graph, sizes)
    target = budget * before.example_flops
    floor = before.example_flops - sum((layer.units - 1) * layer.flops_per_unit for layer in candidates)
    if floor > target:
        raise SpecError(Diagnostic(budget_span, f"the FLOP budget {budget:g} cannot be met: with one head or neuron "
                                                f"left in every prunable layer the model still needs "
                                                f"{floor / before.example_flops:.3f} of its FLOPs ({floor} of "
                                                f"{before.example_flops})"))
    if base is None:
        check_memory(graph, src.file)
        base = init_weights(graph)
    batches, described = calibration(src, graph, base, calib, samples, seed, calib_span)
    importance = measure(src, graph, base, layers, candidates, batches, calib_span)
    keep = select(candidates, importance, before.example_flops, target)
    pruned = prune_structure(graph, keep).graph if keep else graph
    after = summarize(pruned, sizes)
    if after.example_flops > target:  # the per-unit costs are exact; a miss is a compiler bug
        raise AssertionError(f"pruned FLOPs {after.example_flops} exceed the budget {target}")
    reports = tuple(LayerReport(layer.path, layer.kind, layer.units, tuple(keep.get(layer.path, range(layer.units))),
                                tuple(float(v) for v in importance.get(layer.path, ())), layer.reason)
                    for layer in layers)
    report = PruneReport(graph.name, budget, before.example_flops, after.example_flops, before.params, after.params,
                         described, reports, sizes, pruned, Path(out) if out is not None else None)
    if out is not None:
        files = artifacts(pruned, src.text, src.file, src.spec.paper, src.spec.description, weights=base,
                          ctx=PassContext(opt_level=opt_level))
        manifest = json.loads(files["manifest.json"])
        manifest["prune"] = report.to_json()
        files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
        write_atomic(Path(out), files)
    return report


# -- calibration --------------------------------------------------------------------------------

def calibration(src, graph: Graph, base, calib, samples: int, seed: int, where: Span):
    """(list of input tuples, a description) for the calibration."""
    import torch

    if calib is None:
        calib = "data" if src.spec.train is not None else "example"
    if calib == "example":
        model = _model(src, graph, base)
        return [model.example_inputs(seed=seed + i) for i in range(EXAMPLE_BATCHES)], \
            f"example inputs, seeds {seed}..{seed + EXAMPLE_BATCHES - 1}"
    if calib == "data":
        if src.spec.train is None:
            raise SpecError(Diagnostic(where, f"--calib data needs the spec's train: section (a data set); "
                                              f"{graph.name} has none: use --calib example or a file"))
        from specc.train.loop import draw_inputs, load_data
        from specc.train.recipe import check_recipe

        recipe = check_recipe(src, graph)
        train, _ = load_data(recipe)
        n = len(next(iter(train.values())))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
        part = {k: v[idx] for k, v in train.items()}
        scalars = _scalars(recipe)
        drawn = draw_inputs(recipe, 0, 1, scalars, len(idx), fixed=True)  # train.random: evaluation's draws
        args = []
        for name, _ in graph.inputs:
            if name in recipe.scalar_inputs:
                args.append(torch.tensor(scalars[recipe.scalar_inputs[name]]))
            elif name in recipe.random:
                args.append(drawn[name])
            else:
                args.append(part[recipe.feed[name]])
        data = recipe.generator.name if recipe.generator is not None else Path(recipe.data_file.file).name
        return [tuple(args)], f"{len(idx)} samples of the train split of {data} (seed {seed})"
    return [_from_file(Path(calib), graph, samples, where)], f"{Path(calib).name} (first {samples} samples)"


def _scalars(recipe) -> dict[str, float]:
    from specc.train.expr import Clock, evaluate, scalar_functions

    clock = Clock(1)
    fns = scalar_functions(clock)
    env: dict[str, Any] = {**recipe.params, **clock.env()}
    out = {}
    for name, e in recipe.scalars.items():
        out[name] = env[name] = float(evaluate(e, env, fns, recipe.sources))
    return out


def _from_file(path: Path, graph: Graph, samples: int, where: Span):
    import numpy as np
    import torch

    span = Span(str(path), 0, 0)
    if not path.is_file():
        raise SpecError(Diagnostic(span, "cannot read the calibration file: no such file (give a .npz or "
                                         ".safetensors file, or --calib data / --calib example)"))
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: torch.from_numpy(np.ascontiguousarray(f[k])) for k in f.files}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            raise SpecError(Diagnostic(span, "the calibration file must be .npz or .safetensors"))
    except SpecError:
        raise
    except Exception as e:  # a damaged archive: numpy and safetensors raise various errors
        raise SpecError(Diagnostic(span, f"cannot read the calibration file: {str(e).splitlines()[0]}")) from None
    args = []
    for name, nid in graph.inputs:
        t = graph.node(nid).type
        if name not in tensors:
            raise SpecError(Diagnostic(span, f"the calibration file has no tensor '{name}' (the model's inputs: "
                                             f"{', '.join(n for n, _ in graph.inputs)}; it has: "
                                             f"{', '.join(sorted(tensors)) or 'none'})"))
        v = tensors[name]
        want = getattr(torch, DTYPES[t.dtype])
        if v.dtype.is_floating_point != want.is_floating_point or v.dim() != t.rank:
            raise SpecError(Diagnostic(span, f"calibration tensor '{name}' is {str(v.dtype).replace('torch.', '')}"
                                             f"{list(v.shape)}, but the input is {t}"))
        if t.value_range is not None and v.numel() and (int(v.min()) < t.value_range[0]
                                                         or int(v.max()) >= t.value_range[1]):
            raise SpecError(Diagnostic(span, f"calibration tensor '{name}' has values outside "
                                             f"range{tuple(t.value_range)} (input {t})"))
        args.append(v[:samples].to(want))
    return tuple(args)


# -- importance ---------------------------------------------------------------------------------

def _model(src, graph: Graph, base):
    from specc.backends.pytorch.build import artifacts, load_in_memory

    return load_in_memory(artifacts(graph, src.text, src.file, weights=base, ctx=PassContext(opt_level=0)))


#: Units masked in one forward pass when the calibration inputs stack along their first axis (up to
#: this many samples in one pass).
STACK_SAMPLES = 2048


def measure(src, graph: Graph, base, layers: list[Layer], candidates: list[Layer], batches, where: Span):
    """{layer path: float64 tensor of each unit's importance} for the candidate layers.

    Each unit is masked alone. When every input and every measured feature has the samples along its first
    axis and the model treats samples independently (checked: the first half of the batch alone gives
    the same features), several units are measured in one forward pass, each on its own copy of the
    batch; otherwise one pass per unit and batch."""
    import torch

    model = _model(src, graph, base).double().eval()
    batches = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    state: dict[str, Any] = {"path": None, "mask": None, "record": None}

    def masker(path: str):
        def hook(module, args):
            if state["path"] != path:
                return None
            x, m = args[0], state["mask"]
            if m.dim() == 2:  # one mask per sample: [samples, width]
                m = m.reshape(m.shape[0], *[1] * (x.dim() - 2), m.shape[1])
            return (x * m,) + tuple(args[1:])
        return hook

    def recorder(path: str):
        def hook(module, args, output):
            if state["record"] is not None:
                state["record"].append((path, output))
        return hook

    handles = []
    for layer in layers:
        module = model.get_submodule(layer.path)
        handles.append(module.register_forward_hook(recorder(layer.path)))
        if layer.reason is None:
            inner = module.o if layer.op == "attention" else module.fc2
            handles.append(inner.register_forward_pre_hook(masker(layer.path)))

    def features(args) -> list[tuple[str, torch.Tensor]]:
        state["record"] = []
        try:
            out = model(*args)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise SpecError(Diagnostic(where, f"the model failed on the calibration batch: "
                                              f"{str(e).splitlines()[0]}")) from None
        finally:
            recorded, state["record"] = state["record"], None
        outs = out if isinstance(out, tuple) else (out,)
        return recorded + [("<output>", o) for o in outs if o.is_floating_point()]

    try:
        with torch.no_grad():
            reference = [features(args) for args in batches]
            norms = [[(f ** 2).sum().clamp_min(1e-300) for _, f in ref] for ref in reference]
            stack = [_stack_size(args, ref, features) for args, ref in zip(batches, reference)]
            out: dict[str, torch.Tensor] = {}
            for layer in candidates:
                width, n = layer.unit_width, layer.units
                scores = torch.zeros(n, dtype=torch.float64)
                for args, ref, norm, g in zip(batches, reference, norms, stack):
                    first = next(i for i, (p, _) in enumerate(ref) if p == layer.path)
                    samples = args[0].shape[0] if g > 1 else 1
                    for lo in range(0, n, g):
                        units = range(lo, min(n, lo + g))
                        mask = torch.ones(len(units), n * width, dtype=torch.float64)
                        for j, u in enumerate(units):
                            mask[j, u * width:(u + 1) * width] = 0.0
                        state["path"] = layer.path
                        if g > 1:  # copy j of the batch has unit units[j] masked
                            state["mask"] = mask.repeat_interleave(samples, dim=0)
                            got = features(tuple(t.repeat(len(units), *[1] * (t.dim() - 1)) for t in args))
                        else:
                            state["mask"] = mask[0]
                            got = features(args)
                        for (_, f), (_, r), nr in zip(got[first + 1:], ref[first + 1:], norm[first + 1:]):
                            diff = f.reshape(len(units), *r.shape) - r if g > 1 else (f - r)[None]
                            scores[lo:lo + len(units)] += (diff ** 2).flatten(1).sum(1) / nr
                state["path"] = state["mask"] = None
                out[layer.path] = scores / len(batches)
            return out
    finally:
        for h in handles:
            h.remove()


def _stack_size(args, reference, features) -> int:
    """How many masked copies of this batch one forward pass may hold (1: one pass per unit)."""
    n = args[0].shape[0] if args and args[0].dim() else 0
    if n < 2 or any(t.dim() == 0 or t.shape[0] != n for t in args) or any(f.dim() == 0 or f.shape[0] != n
                                                                           for _, f in reference):
        return 1
    half = features(tuple(t[:n // 2] for t in args))  # samples must not see each other
    for (_, h), (_, f) in zip(half, reference):
        if h.shape[1:] != f.shape[1:] or not _close(h, f[:n // 2]):
            return 1
    return max(1, STACK_SAMPLES // n)


def _close(a, b) -> bool:
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(((a - b).abs().max() <= 1e-9 * scale).item()) if a.numel() else True


def select(candidates: list[Layer], importance, flops: int, target: float) -> dict[str, list[int]]:
    """The units to keep per layer: the least important per FLOP removed first, all layers ranked
    together, until the FLOPs are within `target`; one unit per layer at least."""
    ranked = sorted(((float(importance[layer.path][u]) / layer.flops_per_unit, order, u)
                     for order, layer in enumerate(candidates) for u in range(layer.units)))
    left = {layer.path: layer.units for layer in candidates}
    removed: dict[str, set[int]] = {layer.path: set() for layer in candidates}
    for _, order, unit in ranked:
        if flops <= target:
            break
        layer = candidates[order]
        if left[layer.path] == 1:
            continue
        left[layer.path] -= 1
        removed[layer.path].add(unit)
        flops -= layer.flops_per_unit
    return {path: [u for u in range(layer.units) if u not in removed[path]]
            for path, layer in ((c.path, c) for c in candidates) if removed[path]}


def summary_lines(report: PruneReport) -> list[str]:
    """The table `specc prune` prints."""
    from specc.compiler.summary import human

    width = max([len(layer.path) for layer in report.layers] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<8} {'kept':>11}"]
    for layer in report.layers:
        note = f"  (left whole: {layer.reason})" if layer.reason else ""
        lines.append(f"{layer.path:<{width}}  {layer.kind:<8} {f'{layer.after}/{layer.before}':>11}{note}")
    frac = report.flops_after / report.flops_before if report.flops_before else 1.0
    at = f" at {', '.join(f'{k}={v}' for k, v in report.sizes.items())}" if report.sizes else ""
    lines.append(f"FLOPs       {human(report.flops_before)} -> {human(report.flops_after)}{at} "
                 f"({frac:.3f} of the original; budget {report.budget:g})")
    lines.append(f"parameters  {report.params_before:,} -> {report.params_after:,}")
    lines.append(f"calibration {report.calibration}")
    return lines


__all__ = ["prune", "run", "PruneReport", "LayerReport", "PruneError", "select", "measure", "calibration",
           "summary_lines", "CRITERION"]
