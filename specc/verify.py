"""`specc verify`: Hypothesis hunts for inputs on which the optimised (or compiled) model differs from
the unoptimised one.

Random bindings of the spec's symbolic dimensions (within their declared bounds) and random inputs
(seeded, scaled so that they stay finite) are run through the reference, the -O0 PyTorch module in
float64, and the candidate: the -On PyTorch module in float32, or the TVM-compiled model. Weights
are the spec's seeded initial weights plus seeded noise, so that norm gains of exactly 1 and zero
biases cannot hide a wrong rewrite, or the user's given weights (`--weights`: e.g. a trained model's)
as they are. A mismatch is shrunk by Hypothesis to a small counterexample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from specc.backends.pytorch.build import artifacts, check_memory, load_in_memory
from specc.backends.pytorch.weights import init_weights, materialise
from specc.compiler.ir import Graph
from specc.compiler.passes import PassContext, optimize

TARGETS = ("torch", "tvm-llvm")
#: |candidate - oracle| <= ATOL * max(1, max |oracle| of that output) + RTOL * |oracle| (float32 candidate,
#: float64 oracle): the absolute part follows the output's scale, since float32 rounding of its large
#: elements' computation reaches its small ones (a U-Net's output near 1e3 had errors of 1.4e-4 on its
#: elements near 0, with nothing wrong).
ATOL, RTOL = 1e-4, 1e-4
#: The same for a float16 or bfloat16 output (its model computes in that precision): about 10 units in
#: the last place at 1 (float32's 1e-4 is about 840 of its units, for deeper accumulations).
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 8e-2}


@dataclass
class Mismatch:
    bindings: dict[str, int]
    input_seed: int
    input_scale: float
    output: str
    error: float
    bound: float
    bool_fill: bool | None = None  # bool inputs all false / all true (None: the example inputs' random ones)


@dataclass
class Report:
    examples: int = 0
    worst: float = 0.0
    worst_output: str = ""
    #: output -> its tolerance's factor (ATOL = RTOL; HALF_TOL for a float16 or bfloat16 output)
    tolerance: dict[str, float] = field(default_factory=dict)
    mismatch: Mismatch | None = None
    notes: list[str] = field(default_factory=list)
    divided_by_zero: int = 0  # generated inputs on which the reference raised ZeroDivisionError (skipped)

    @property
    def ok(self) -> bool:
        return self.mismatch is None


def perturbed(weights: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in weights.items()}


def float64_run(model, inputs):
    """Run a float64 copy of a model, with float64 as torch's default dtype (for values it creates)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return model(*(i.double() if i.is_floating_point() else i for i in inputs))
    finally:
        torch.set_default_dtype(previous)


def _candidate(graph: Graph, base: dict[str, torch.Tensor], text: str, file: str, opt_level: int, target: str):
    ctx = PassContext(opt_level=opt_level, verify_each=True)
    if target == "torch":
        return load_in_memory(artifacts(graph, text, file, weights=base, ctx=ctx))
    from specc.backends.tvm.build import compile_graph  # needs the tvm extra

    optimised, _ = optimize(graph, ctx)
    return compile_graph(optimised, "llvm", weights=materialise(optimised, base))


def verify_graph(graph: Graph, text: str, file: str, examples: int = 50, opt_level: int = 2,
                 target: str = "torch", seed: int = 0, weights: dict[str, torch.Tensor] | None = None) -> Report:
    """Compare the candidate against the float64 reference on `examples` generated inputs. `weights`:
    every parameter of the unoptimised graph (as given_weights returns them), used as they are;
    None: the seeded initialisation plus seeded noise."""
    from hypothesis import HealthCheck, Phase, given, reject, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    check_memory(graph, file, copies=5)  # the weights, the float64 reference (2x) and the candidate's copies
    base = perturbed(init_weights(graph), seed) if weights is None else weights
    reference = load_in_memory(artifacts(graph, text, file, weights=base, ctx=PassContext(opt_level=0)))
    reference = reference.double()
    candidate = _candidate(graph, base, text, file, opt_level, target)
    names = [name for name, _ in graph.outputs]
    report = Report()

    # bool inputs (masks) also all false and all true: a query that may see no key is an edge case of its own
    has_bool = any(graph.node(nid).type.dtype == "bool" for _, nid in graph.inputs)
    dims = {}
    for sym, (example, lo, hi) in graph.dims.items():
        dims[sym] = st.integers(lo, hi if hi is not None else max(lo, 2 * example))

    def run(bindings: dict[str, int], input_seed: int, scale: float, fill: bool | None) -> None:
        inputs = reference.example_inputs(seed=input_seed, **bindings)
        inputs = tuple(i * scale if i.is_floating_point() else
                       torch.full_like(i, fill) if fill is not None and i.dtype == torch.bool else i for i in inputs)
        with torch.no_grad():
            try:
                want = float64_run(reference, inputs)
            except RuntimeError as e:  # an integer // or % by an input's 0: no example of the model's function
                if "ZeroDivisionError" not in str(e):
                    raise
                report.divided_by_zero += 1
                reject()
            try:
                got = candidate(*inputs)
            except RuntimeError as e:
                if "ZeroDivisionError" not in str(e):
                    raise
                raise AssertionError(Mismatch(bindings, input_seed, scale, names[0], float("inf"), 0.0, fill)) from None
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        report.examples += 1
        for name, w, g in zip(names, want, got):
            if tuple(g.shape) != tuple(w.shape):
                raise AssertionError(Mismatch(bindings, input_seed, scale, name, float("inf"), 0.0, fill))
            if not w.is_floating_point():
                if not torch.equal(g.to(w.dtype), w):
                    raise AssertionError(Mismatch(bindings, input_seed, scale, name, float("inf"), 0.0, fill))
                continue
            atol = rtol = report.tolerance[name] = HALF_TOL.get(g.dtype, ATOL)
            g = g.double()
            # equal infinities (e.g. -inf mask fills) and NaN where the reference has NaN agree exactly
            same = (g == w) | (torch.isnan(g) & torch.isnan(w))
            err = torch.where(same, torch.zeros_like(w), (g - w).abs().nan_to_num(nan=float("inf")))
            size = w.abs().nan_to_num(posinf=0.0, neginf=0.0)
            bound = atol * max(1.0, float(size.max()) if size.numel() else 1.0) + rtol * size
            worst = float(err.max()) if err.numel() else 0.0
            if worst > report.worst:
                report.worst, report.worst_output = worst, name
            if not bool((err <= bound).all()):
                i = int((err - bound).flatten().argmax())
                raise AssertionError(Mismatch(bindings, input_seed, scale, name, float(err.flatten()[i]),
                                              float(bound.flatten()[i]), fill))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(bindings=st.fixed_dictionaries(dims), input_seed=st.integers(0, 2**16),
           scale=st.sampled_from([1.0, 0.1, 3.0]),
           fill=st.sampled_from([None, False, True] if has_bool else [None]))
    def search(bindings, input_seed, scale, fill):
        run(bindings, input_seed, scale, fill)

    try:
        search()
    except AssertionError as e:
        if e.args and isinstance(e.args[0], Mismatch):
            report.mismatch = e.args[0]
        else:
            raise
    except Unsatisfiable:
        from specc.dsl.diagnostics import Diagnostic, SpecError, Span

        raise SpecError(Diagnostic(Span(file, 1, 1), f"verify: the unoptimised model divided an integer by 0 on "
                                                     f"every generated input ({report.divided_by_zero} tries)",
                                   notes=("example inputs draw integers without a range from 0 to 7: give the "
                                          "divisor's input a range without 0, e.g. i64[B] in range(1, 8)",)),
                        {file: text}) from None
    if report.divided_by_zero:
        report.notes.append(f"{report.divided_by_zero} generated inputs made the unoptimised model divide an integer "
                            f"by 0 (torch raises); they are no examples and were skipped")
    return report


def verify(path_or_text: str | Path, examples: int = 50, opt_level: int = 2, target: str = "torch",
           overrides: dict[str, Any] | None = None, allow_imports: Iterable[str] = (),
           weights: Mapping[str, Any] | None = None) -> Report:
    """Verify a spec: the optimised (or compiled) model against the unoptimised one. allow_imports:
    the modules of the spec's `imports:` you allow it to import (as for specc.load); weights: values
    of some parameters (names as `specc ir -O0` prints them), the rest seeded, none perturbed."""
    from specc.api import _front, given_weights

    src, graph = _front(path_or_text, dict(overrides or {}), allow_imports=allow_imports)
    return verify_graph(graph, src.text, src.file, examples, opt_level, target, weights=given_weights(graph, weights))
