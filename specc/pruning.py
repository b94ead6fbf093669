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
choice of `samples` of them, all of it when it holds fewer); "example": the spec's example inputs for
seeds seed .. seed+3; or a .npz / .safetensors file holding one tensor per model input, samples along
the first axis of the inputs whose first axis is the batch dimension B (the first `samples` are used, all
of them when it holds fewer; its tensors are checked against the inputs' types, shapes, ranges and for
NaN / inf). The default is "data" when the spec has a train: section, else "example". The description
printed and recorded in the manifest says how many samples were used. The cost is one forward pass of
the calibration samples per head and neuron, `STACK_SAMPLES` samples at a time (so memory does not grow
with `samples`; time does), and `samples` is at most `MAX_SAMPLES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from specc.compiler.diagnostics import Diagnostic, Span, SpecError
from specc.compiler.dims import evaluate, symbol_name
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
          allow_imports: Iterable[str] = (), overrides: dict[str, Any] | None = None, force: bool = False,
          **more_overrides: Any) -> PruneReport:
    """Prune a spec's attention heads and MLP neurons to `flops` (a fraction) of its FLOPs and, with
    `out`, write the pruned build there (model.py, weights.safetensors, manifest.json with a "prune"
    entry). calib: "data", "example" or a file (see the module doc); at: {dimension: size} to count the
    FLOPs at instead of the spec's example sizes (e.g. {"T": 128}); weights: {name: tensor} of the
    spec's parameters (a trained model), as for specc.load; force: replace an `out` that is not empty
    and not an earlier specc build, as `specc prune --force`. Raises SpecError on a user error."""
    from specc.api import _front, given_weights

    src, graph = _front(path_or_text, {**(overrides or {}), **more_overrides}, allow_imports=allow_imports)
    budget = check_budget(flops, Span("<flops>", 0, 0))
    base = given_weights(graph, weights)
    return run(src, graph, budget, base=base, calib=calib, samples=samples, seed=seed, opt_level=opt_level,
               out=out, at=at, force=force)


def run(src, graph: Graph, budget: float, *, base=None, calib: str | Path | None = None, samples: int = 64,
        seed: int = 0, opt_level: int = 1, out: str | Path | None = None, at: Mapping[str, int] | None = None,
        budget_span: Span | None = None, calib_span: Span | None = None, at_span: Span | None = None,
        force: bool = False, protect: tuple = ()) -> PruneReport:
    """The whole command on an elaborated spec: importance, ranking, rewrite, and (with `out`) the build.

    samples: how many calibration samples "data" or a file gives, 1 to MAX_SAMPLES (an error beyond:
    the importances cost one forward pass of them per head and neuron); a data split or file holding
    fewer is used whole, and the report's calibration (printed, and in the manifest) says how many were
    used and how many were asked for. Memory does not grow with them (measure evaluates STACK_SAMPLES at
    a time). Every user error is raised before anything is written. `out` is replaced as `specc build`
    replaces it (`force`, `protect`: see specc.backends.outdir; the spec and a calibration file are
    always protected), checked before any work."""
    from specc.backends.outdir import check
    from specc.backends.pytorch.build import artifacts, check_memory, write_atomic
    from specc.backends.pytorch.weights import init_weights

    if out is not None:
        protect = (src.file, calib if isinstance(calib, (str, Path)) and calib not in ("data", "example") else None,
                   *protect)
        check(out, force=force, protect=protect)

    budget_span = budget_span or Span("<flops>", 0, 0)
    calib_span = calib_span or Span("<calib>", 0, 0)
    budget = check_budget(budget, budget_span)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SpecError(Diagnostic(calib_span, f"the calibration sample count must be a positive integer, "
                                               f"got {samples!r}"))
    if samples > MAX_SAMPLES:  # the measure's time grows with it (memory does not: see measure)
        raise SpecError(Diagnostic(calib_span, f"at most {MAX_SAMPLES} calibration samples, got {samples}: the "
                                               f"importances cost one forward pass of them per head and neuron, "
                                               f"and a few hundred already fix the ranking"))
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
        write_atomic(Path(out), files, force=force, protect=protect)
    return report


# -- calibration --------------------------------------------------------------------------------

def calibration(src, graph: Graph, base, calib, samples: int, seed: int, where: Span):
    """(list of input tuples, a description) for the calibration. The description names how many samples
    are used: with "data" or a file, `samples` of them or, when the split or the file holds fewer, all
    of them (said so: "..., 64 asked for"), never a count that was not run."""
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
        data = recipe.generator.name if recipe.generator is not None else Path(recipe.data_file.file).name
        if n == 0:
            raise SpecError(Diagnostic(where, f"--calib data: the train split of {data} holds no samples"))
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
        # a split smaller than `samples` is used whole, and the description says so (as for a file)
        fewer = f"; all it holds, {samples} asked for" if len(idx) < samples else ""
        return [tuple(args)], f"{len(idx)} samples of the train split of {data} (seed {seed}{fewer})"
    args, used, held = _from_file(Path(calib), graph, samples, where)
    if used is None:
        return [args], f"{Path(calib).name} (one batch: no input has a sample axis)"
    if used < samples:
        return [args], f"{Path(calib).name} (all {used} of its samples, {samples} asked for)"
    return [args], f"{Path(calib).name} (first {used} of its {held} samples)" if held > used \
        else f"{Path(calib).name} (all {used} of its samples)"


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
    """(the input tuple, the samples used, the samples the file holds; both None when no input has a
    sample axis) from a calibration file.

    Every input's tensor is checked, errors located at the file: its kind (float, integer or bool;
    integers for a bool input must be 0 or 1, not cast), its rank and the sizes its type fixes
    (static axes, a dimension's bounds, the same size wherever a dimension recurs), its values
    (finite floats, integers within the input's range and dtype), and the sample count: the inputs whose
    first axis is the batch dimension (B: the first axis of the most inputs) hold the samples along it,
    the same number in each, at least one. The others (no axes, a static first axis, a mask [T, T]) are
    taken whole."""
    import numpy as np
    import torch

    span = Span(str(path), 0, 0)
    if not path.is_file():
        raise SpecError(Diagnostic(span, "cannot read the calibration file: no such file (give a .npz or "
                                         ".safetensors file, or --calib data / --calib example)"))
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: torch.from_numpy(np.array(f[k], order="C")) for k in f.files}  # keeps 0-d ones 0-d
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            raise SpecError(Diagnostic(span, "the calibration file must be .npz or .safetensors"))
    except SpecError:
        raise
    except Exception as e:  # a damaged archive: numpy and safetensors raise various errors
        raise SpecError(Diagnostic(span, f"cannot read the calibration file: {str(e).splitlines()[0]}")) from None

    def fail(message: str):
        raise SpecError(Diagnostic(span, message))

    def kind(dtype) -> str:
        return "float" if dtype.is_floating_point else "bool" if dtype == torch.bool else \
            "complex" if dtype.is_complex else "integer"

    def described(name: str, v) -> str:
        return f"calibration tensor '{name}' is {str(v.dtype).replace('torch.', '')}{list(v.shape)}"

    given = {}  # name: (tensor, type, torch dtype)
    for name, nid in graph.inputs:
        t = graph.node(nid).type
        if name not in tensors:
            fail(f"the calibration file has no tensor '{name}' (the model's inputs: "
                 f"{', '.join(n for n, _ in graph.inputs)}; it has: {', '.join(sorted(tensors)) or 'none'})")
        v, want = tensors[name], getattr(torch, DTYPES[t.dtype])
        # integers may stand for a bool input (0 / 1, checked below); otherwise the kinds must agree
        fits = kind(v.dtype) == kind(want) or (kind(want) == "bool" and kind(v.dtype) == "integer") \
            or (kind(want) == "integer" and kind(v.dtype) == "bool")
        if not fits or v.dim() != t.rank:
            fail(f"{described(name, v)}, but the input is {t}")
        given[name] = (v, t, want)

    # the samples: along the first axis of the inputs whose first axis is the batch dimension, the dimension
    # that is the first axis of the most inputs and, of those, the other axes of the fewest (B; a mask
    # [T, T] beside x [B, T, d] is taken whole)
    firsts = [symbol_name(t.shape[0]) for _, t, _ in given.values() if t.rank and symbol_name(t.shape[0]) in graph.dims]
    others = [symbol_name(d) for _, t, _ in given.values() for d in t.shape[1:]]
    batch = max(dict.fromkeys(firsts), key=lambda s: (firsts.count(s), -others.count(s))) if firsts else None
    batched = [name for name, (v, t, _) in given.items() if t.rank and symbol_name(t.shape[0]) == batch]
    counts = {name: given[name][0].shape[0] for name in batched}
    if len(set(counts.values())) > 1:
        fail("the calibration tensors hold different numbers of samples (their first axis): "
             + ", ".join(f"'{k}' {n}" for k, n in counts.items()))
    held = next(iter(counts.values()), None)  # None: no batched input, the tensors are one batch
    if held == 0:
        name = next(iter(counts))
        fail(f"the calibration file holds no samples ({described(name, given[name][0])})")
    used = min(samples, held) if held is not None else None

    bindings: dict[str, int] = {symbol_name(given[name][1].shape[0]): used for name in batched}
    bound_by: dict[str, str] = {}
    later = []
    for name, (v, t, _) in given.items():
        for axis, (d, size) in enumerate(zip(t.shape, v.shape)):
            if axis == 0 and name in batched:
                continue
            symbol = symbol_name(d)
            if isinstance(d, int):
                if size != d:
                    fail(f"{described(name, v)}, but the input is {t}: axis {axis} must be {d}")
            elif symbol in graph.dims and symbol not in bindings:
                _, lo, hi = graph.dims[symbol]
                if size < lo or (hi is not None and size > hi):
                    fail(f"{described(name, v)}, but the input is {t} with {symbol} from {lo} to "
                         f"{'any' if hi is None else hi}: axis {axis} is {size}")
                bindings[symbol], bound_by[symbol] = size, name
            else:
                later.append((name, v, t, axis, d, size))
    for name, v, t, axis, d, size in later:  # recurring dimensions and expressions of them
        try:
            expect = evaluate(d, bindings)
        except KeyError:  # a dimension no axis alone fixes: the model checks it when it runs
            continue
        if size != expect:
            fail(f"{described(name, v)}, but the input is {t}: axis {axis} must be {expect}"
                 + (f" ({d} as '{bound_by[symbol_name(d)]}' has it)" if symbol_name(d) in bound_by else f" ({d})"))

    args = []
    for name, nid in graph.inputs:
        v, t, want = given[name]
        if name in batched:
            v = v[:used]
        if v.is_floating_point():
            for bad, what in ((~torch.isfinite(v), "NaN or infinite values"),  # then: too large for f32, f16
                              (~torch.isfinite(v.to(want)), f"values too large for the input's {t.dtype}")):
                if bool(bad.any()):
                    at = f" (sample {int(bad.reshape(v.shape[0], -1).any(1).nonzero()[0])})" if name in batched else ""
                    fail(f"{described(name, v)} and has {what}{at}: the importances would be meaningless")
        elif want == torch.bool and v.dtype != torch.bool:
            odd = v[(v != 0) & (v != 1)]
            if odd.numel():
                fail(f"{described(name, v)} with values other than 0 and 1 (e.g. {int(odd[0])}), but the input "
                     f"is {t}: give bool values (or 0 and 1)")
        elif want != torch.bool and v.numel():
            lo, hi = int(v.min()), int(v.max())
            if t.value_range is not None and (lo < t.value_range[0] or hi >= t.value_range[1]):
                fail(f"calibration tensor '{name}' has values outside range{tuple(t.value_range)} (input {t})")
            info = torch.iinfo(want)
            if lo < info.min or hi > info.max:
                fail(f"{described(name, v)} with values from {lo} to {hi}, outside what the input's {t.dtype} "
                     f"holds (input {t})")
        args.append(v.to(want))
    return tuple(args), used, held


# -- importance ---------------------------------------------------------------------------------

def _model(src, graph: Graph, base):
    from specc.backends.pytorch.build import artifacts, load_in_memory

    return load_in_memory(artifacts(graph, src.text, src.file, weights=base, ctx=PassContext(opt_level=0)))


#: Samples in one forward pass: units masked together when the calibration inputs stack along their
#: first axis (up to this many samples in one pass, masked copies included), and the chunk a larger batch
#: is evaluated in, so memory does not grow with the calibration samples.
STACK_SAMPLES = 2048

#: The most calibration samples (`samples`, --samples): the measure costs one forward pass of them per
#: head and neuron, so its time grows with them (specs/gpt.yaml, 520 units: 15 s for 256 samples, 3
#: minutes for 2048 on two cores, so about 40 for its whole 27000-sample split), and more samples than
#: this hardly move a ranking that a few hundred already fix.
MAX_SAMPLES = 4096


def measure(src, graph: Graph, base, layers: list[Layer], candidates: list[Layer], batches, where: Span):
    """{layer path: float64 tensor of each unit's importance} for the candidate layers.

    Each unit is masked alone. When every input and every measured feature has the samples along its first
    axis and the model treats samples independently (checked: the first half of the batch alone gives
    the same features), several units are measured in one forward pass, each on its own copy of the
    batch; otherwise one pass per unit and batch. Such a batch of more than STACK_SAMPLES samples is
    evaluated in chunks of that many: the squared errors and the features' squared norms are summed over
    the chunks before one divides the other, so the importances are those of the whole batch (up to
    rounding) while memory stays that of a chunk. Raises SpecError when an importance is NaN or infinite
    (NaN weights, or features that overflow), rather than ranking on it."""
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

    def errors(args):
        """({layer path: [units, features] squared errors}, [features] squared norms) of one batch."""
        err: dict[str, torch.Tensor] = {}
        norm = None
        for chunk in _chunks(args, features):
            ref = features(chunk)
            g = _stack_size(chunk, ref, features)
            sq = torch.stack([(f ** 2).sum() for _, f in ref])
            norm = sq if norm is None else norm + sq
            for layer in candidates:
                width, n = layer.unit_width, layer.units
                e = err.setdefault(layer.path, torch.zeros(n, len(ref), dtype=torch.float64))
                first = next(i for i, (p, _) in enumerate(ref) if p == layer.path)
                samples = chunk[0].shape[0] if g > 1 else 1
                for lo in range(0, n, g):
                    units = range(lo, min(n, lo + g))
                    mask = torch.ones(len(units), n * width, dtype=torch.float64)
                    for j, u in enumerate(units):
                        mask[j, u * width:(u + 1) * width] = 0.0
                    state["path"] = layer.path
                    if g > 1:  # copy j of the batch has unit units[j] masked
                        state["mask"] = mask.repeat_interleave(samples, dim=0)
                        got = features(tuple(t.repeat(len(units), *[1] * (t.dim() - 1)) for t in chunk))
                    else:
                        state["mask"] = mask[0]
                        got = features(chunk)
                    for k, ((_, f), (_, r)) in enumerate(zip(got[first + 1:], ref[first + 1:]), start=first + 1):
                        diff = f.reshape(len(units), *r.shape) - r if g > 1 else (f - r)[None]
                        e[lo:lo + len(units), k] += (diff ** 2).flatten(1).sum(1)
                state["path"] = state["mask"] = None
        return err, norm.clamp_min(1e-300)

    try:
        with torch.no_grad():
            out = {layer.path: torch.zeros(layer.units, dtype=torch.float64) for layer in candidates}
            for args in batches:
                err, norm = errors(args)
                for path, e in err.items():  # each later feature weighs the same (0 before the layer)
                    out[path] += (e / norm).sum(1)
            out = {path: v / len(batches) for path, v in out.items()}
    finally:
        for h in handles:
            h.remove()
    bad = [path for path, v in out.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise SpecError(Diagnostic(where, f"the importances of '{bad[0]}' are NaN or infinite on the calibration "
                                          f"batch (NaN weights, or features that overflow in float64): nothing "
                                          f"to rank the heads and neurons by"))
    return out


def _chunks(args, features) -> list[tuple]:
    """The batch in chunks of STACK_SAMPLES samples when it has more and they are independent (checked on
    the first chunk, as _stack_size does), else the batch whole."""
    n = args[0].shape[0] if args and args[0].dim() else 0
    if n <= STACK_SAMPLES or any(t.dim() == 0 or t.shape[0] != n for t in args):
        return [args]
    first = tuple(t[:STACK_SAMPLES] for t in args)
    if not _independent(first, features(first), features):
        return [args]
    return [tuple(t[lo:lo + STACK_SAMPLES] for t in args) for lo in range(0, n, STACK_SAMPLES)]


def _stack_size(args, reference, features) -> int:
    """How many masked copies of this batch one forward pass may hold (1: one pass per unit)."""
    if not _independent(args, reference, features):
        return 1
    return max(1, STACK_SAMPLES // args[0].shape[0])


def _independent(args, reference, features) -> bool:
    """Whether the inputs and the features `reference` (of `args`) hold the samples along their first axis
    and the model treats them independently: the first half of the batch alone gives the same features."""
    n = args[0].shape[0] if args and args[0].dim() else 0
    if n < 2 or any(t.dim() == 0 or t.shape[0] != n for t in args) or any(f.dim() == 0 or f.shape[0] != n
                                                                           for _, f in reference):
        return False
    half = features(tuple(t[:n // 2] for t in args))  # samples must not see each other
    return all(h.shape[1:] == f.shape[1:] and _close(h, f[:n // 2]) for (_, h), (_, f) in zip(half, reference))


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
           "summary_lines", "CRITERION", "MAX_SAMPLES", "STACK_SAMPLES"]
