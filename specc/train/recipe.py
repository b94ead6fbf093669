"""The `train:` section checked against its spec: every name, argument and pattern resolved.

`check_recipe(src, graph)` is what `specc check` and `specc train` run after the graph is built: it
parses the section's expressions with the graph grammar, resolves the data source and its fields,
the feeds of the model's inputs, the names and functions of the loss and the metrics, the optimizer
and its arguments, the schedules, the parameter groups and frozen patterns, and reports every
problem at once, each at its line and column. Nothing here allocates weights or generates data
(a data file's fields are read when training starts: see `files.py`).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import ValidationError

from specc.compiler.dims import symbol_name
from specc.compiler.ir import Graph
from specc.compiler.tied import partial_tie_message, select, tied_names
from specc.dsl import ast as A
from specc.dsl.diagnostics import Collector, Span, SpecError, did_you_mean
from specc.dsl.parser import parse, walk
from specc.dsl.schema import DataFile, SpecSource, TrainOnly, TrainSection, _located_errors
from specc.dsl.yamlpos import Located, TextOrigin, load_yaml

from . import data as D
from .optim import FLAGS, OPTIMIZERS, UNSUPPORTED, argument_problem
from .expr import (DRAW_KINDS, DRAWS, INF, SCALAR_NAMES, TENSOR_FUNCTIONS, Clock, ExprError, Function, _eval,
                   _kind, sampler, scalar_functions)

OVERRIDES_FILE = "<--set>"


@dataclass(frozen=True)
class RandomInput:
    """A model input fed by a draw made afresh each step (train.random)."""

    draw: A.Call  # subset(...), bernoulli(...), uniform(...) or normal(...), arguments over params and scalars
    shape: tuple[int, ...]  # of one sample (the axes after the batch)
    dtype: str  # the input's
    dims: dict[str, int] = field(default_factory=dict)  # sizes the data fixes (T: 16), names in the arguments


@dataclass
class Recipe:
    """A checked recipe, ready to run."""

    section: TrainSection
    file: str
    sources: dict[str, str]
    params: dict[str, Any]
    generator: D.Generator | None  # None: a data file
    data_args: dict[str, Any]
    data_file: DataFile | None
    fields: dict[str, D.FieldType]
    field_spans: dict[str, Span]
    feed: dict[str, str]  # model input -> data field
    loss: A.Expr
    metrics: dict[str, A.Expr]
    optimizer: str  # the torch.optim class name
    optimizer_args: dict[str, Any]
    schedule: A.Expr | None
    scalars: dict[str, A.Expr]
    groups: list[tuple[list[str], dict[str, Any]]]
    frozen: frozenset[str]
    span: Span  # of the train section
    file_origin: Span | None = None  # of `data.file`
    scalar_inputs: dict[str, str] = field(default_factory=dict)  # model input -> scalar name
    lora_layers: tuple[str, ...] = ()  # linear layers that get a LoRA update (train.lora)
    optimizer_span: Span | None = None
    adapter_layers: tuple[str, ...] = ()  # layers that get an adapter (train.adapters)
    prefix_layers: tuple[str, ...] = ()  # attention layers that get a prefix (train.prefix)
    random: dict[str, RandomInput] = field(default_factory=dict)  # model input -> its draw (train.random)
    group_clips: tuple[float | None, ...] = ()  # per entry of `groups`: its own gradient-norm clip
    group_spans: tuple[Span, ...] = ()  # per entry of `groups`: where it is (torch's checks of its arguments)
    group_key_spans: tuple[dict[str, Span], ...] = ()  # per entry of `groups`: where each argument's key is
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stored parameter -> the names tied to it

    @property
    def ordered(self) -> bool:
        return self.generator.ordered if self.generator else bool(self.data_file and self.data_file.ordered)


def optimizers() -> dict[str, type]:
    """torch.optim's optimizers by lower-case name (adamw, sgd, ...) that a recipe may use."""
    import torch

    return {name.lower(): cls for name, cls in vars(torch.optim).items()
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
            and name.lower() not in UNSUPPORTED}


def group_index(name: str, groups: list[tuple[list[str], dict[str, Any]]],
                tied: Mapping[str, tuple[str, ...]] | None = None) -> int | None:
    """The index of the first of a recipe's `groups` (patterns, optimizer arguments) whose patterns match
    the parameter `name`, which holds it (None: no group does). A stored parameter is also matched by the
    names tied to it (`tied`, `tied_names`): a later step of a shared repeat names step 0's tensor. (That a
    pattern matching some of those names matches all of them is `select`'s check, at `specc check`.)"""
    names = (name, *(tied or {}).get(name, ()))
    return next((i for i, (patterns, _) in enumerate(groups)
                 if any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)), None)


def optimizer_arguments(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")}


def parameter_names(graph: Graph) -> dict[str, bool]:
    """Parameter path -> trainable (not frozen by the spec, not a buffer), tied ones left out."""
    return {".".join(n.path + (p.name,)): not (p.frozen or p.buffer)
            for _, n in graph.nodes() for p in n.params if p.tied_to is None}


def apply_overrides(src: SpecSource, overrides: Mapping[str, tuple[str, Span]]) -> tuple[Located, Collector]:
    """The document with `--set train.KEY=VALUE` overrides in place (values read as YAML scalars)."""
    errors = Collector()
    doc = src.doc
    if not overrides:
        return doc, errors
    data = copy.deepcopy(doc.data)
    spans, origins = dict(doc.spans), dict(doc.origins)
    for key, (text, span) in overrides.items():
        path = tuple(key.split("."))
        if "train" not in data or not isinstance(data.get("train"), dict):
            errors.error(span, f"--set {key}: the spec has no train: section")
            continue
        try:
            value = load_yaml(text, OVERRIDES_FILE).data if text.strip() else ""
        except SpecError:
            value = text
        if isinstance(value, (dict, list)):
            errors.error(span, f"--set {key}: give a single value")
            continue
        parent = data["train"]
        for p in path[:-1]:
            parent = parent.setdefault(p, {}) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                break
        if not isinstance(parent, dict):
            errors.error(span, f"--set {key}: '{'.'.join(path[:-1])}' is not a section")
            continue
        parent[path[-1]] = value
        spans[("train",) + path] = span
        if isinstance(value, str):
            origins[("train",) + path] = TextOrigin(span.file, span.line, span.col, False, len(value), span.col)
    return Located(data, doc.file, doc.text, spans, dict(doc.key_spans), origins), errors


def check_recipe(src: SpecSource, graph: Graph,
                 overrides: Mapping[str, tuple[str, Span]] | None = None) -> Recipe | None:
    """The spec's recipe, checked (None when the spec has none). Raises SpecError with every problem."""
    doc, errors = apply_overrides(src, overrides or {})
    sources = {src.file: src.text}
    if doc.data.get("train") is None:  # nothing to check but the overrides' own errors
        errors.raise_if_any(sources)
        return None
    try:
        section = TrainOnly.model_validate({"train": doc.data.get("train")}).train
    except ValidationError as e:
        errors.extend(_located_errors(e, doc).diagnostics)
        errors.raise_if_any(sources)
        raise AssertionError from e  # pragma: no cover - a validation error has diagnostics
    return _Checker(src, doc, graph, section, errors, sources).run()


class _Checker:
    def __init__(self, src: SpecSource, doc: Located, graph: Graph, section: TrainSection, errors: Collector,
                 sources: dict[str, str]):
        self.src, self.doc, self.graph, self.t, self.errors, self.sources = src, doc, graph, section, errors, sources
        self.params = dict(graph.params)
        self.fields_known = True
        self.optimizer_span: Span | None = None
        self.peft_graph: Graph | None = None  # the graph with the recipe's adapters and prefixes (peft())
        self.tied = tied_names(graph)  # stored parameter -> the names tied to it (freeze: and groups: take both)

    # -- helpers -------------------------------------------------------------------------------
    def span(self, *path) -> Span:
        return self.doc.span(("train",) + path)

    def key_span(self, *path) -> Span:
        return self.doc.key_span(("train",) + path)

    def expression(self, text: str, *path) -> A.Expr | None:
        origin = self.doc.origins.get(("train",) + path)
        if origin is None:
            s = self.span(*path)
            origin = TextOrigin(s.file, s.line, s.col, False, 0, s.col)
        return parse(text, origin, "expression", self.errors)

    def constant(self, e: A.Expr) -> Any:
        try:
            v = _eval(e, self.params, {})
        except ExprError as err:
            self.errors.error(err.span, err.message + (" (arguments here are constants and params)"
                                                       if err.message.startswith("unknown") else ""))
            return _BAD
        return tuple(v) if isinstance(v, list) else v

    def names(self, e: A.Expr, known: set[str], functions: Mapping[str, Function], what: str) -> None:
        """Every name and function in `e` is known; calls take the arguments their function takes."""
        for sub in walk(e):
            if isinstance(sub, A.Call):
                fname = sub.func_name
                if fname is None or fname not in functions:
                    self.errors.error(sub.func.span, f"{what}: unknown function '{fname}'"
                                      + did_you_mean(str(fname), functions),
                                      f"functions: {', '.join(sorted(functions))}")
                    continue
                pos, kw, star = functions[fname].parameters()
                if len(sub.args) > len(pos) and not star:
                    self.errors.error(sub.args[len(pos)].span if hasattr(sub.args[len(pos)], "span") else sub.span,
                                      f"{fname}() takes at most {len(pos)} positional arguments ({', '.join(pos)})")
                given = set(pos[:len(sub.args)])
                for k in sub.kwargs:
                    if k.name not in kw:
                        self.errors.error(k.span, f"{fname}() has no argument '{k.name}'" + did_you_mean(k.name, kw),
                                          f"arguments: {', '.join(sorted(kw))}")
                    given.add(k.name)
                missing = [r for r in functions[fname].required() if r not in given]
                if missing and not star:
                    self.errors.error(sub.span, f"{fname}() is missing the argument{'s' if len(missing) > 1 else ''} "
                                                f"{', '.join(repr(m) for m in missing)}")
            elif isinstance(sub, A.Name) and sub.id not in known and sub.id != INF and not _is_callee(e, sub) \
                    and self.fields_known:
                self.errors.error(sub.span, f"{what}: unknown name '{sub.id}'" + did_you_mean(sub.id, known),
                                  f"names here: {', '.join(sorted(known - set(self.params)))}")

    # -- the sections ----------------------------------------------------------------------------
    def run(self) -> Recipe:
        t = self.t
        outputs = {name for name, _ in self.graph.outputs}
        before = len(self.errors.diagnostics)
        generator, data_args, fields, field_spans = self.data()
        self.fields_known = len(self.errors.diagnostics) == before  # else a loss's field names are not errors
        scalars = self.scalars()
        feed, scalar_inputs = self.feeds(fields, set(scalars))
        random = self.randoms(fields, feed, scalars)
        known = outputs | set(fields) | set(scalars) | set(self.params) | set(SCALAR_NAMES) | set(random)
        clash = sorted(outputs & set(fields))
        for name in clash:
            self.errors.error(self.span("data"), f"the data field '{name}' has the name of a model output; rename "
                                                 f"one of them")
        loss = self.expression(t.loss, "loss")
        if loss is not None:
            self.names(loss, known, TENSOR_FUNCTIONS, "loss")
        metrics: dict[str, A.Expr] = {}
        if t.eval is not None:
            for name, text in t.eval.metrics.items():
                e = self.expression(text, "eval", "metrics", name)
                if e is not None:
                    self.names(e, known | set(), TENSOR_FUNCTIONS, f"metric '{name}'")
                    metrics[name] = e
        if not self.errors:
            self.shapes(fields, feed, [(loss, "loss")] + [(m, f"metric '{n}'") for n, m in metrics.items()], random,
                        set(scalars))
        opt, opt_args = self.optimizer()
        schedule = None
        if t.schedule is not None:
            schedule = self.expression(t.schedule, "schedule")
            if schedule is not None:
                self.scalar_expr(schedule, "schedule", ("schedule",))
        frozen = self.frozen()
        lora = self.lora()
        adapters, prefixes = self.peft()
        trained = self.trained(frozen, lora, adapters or prefixes)
        groups = self.groups(opt, frozenset(trained or ()) - frozenset(parameter_names(self.graph)))
        self.held_groups(groups, trained, bool(lora or adapters or prefixes))
        self.booleans()
        if t.steps is None and t.epochs is None:
            self.errors.error(self.span(), "train: give steps or epochs")
        if t.steps is not None and t.epochs is not None:
            self.errors.error(self.key_span("epochs"), "train: give steps or epochs, not both",
                              "to count epochs in place of the spec's steps from the command line, add --set "
                              "train.steps=null (or train.epochs=null for the other way)")
        self.errors.raise_if_any(self.sources)
        return Recipe(t, self.src.file, self.sources, self.params, generator, data_args, t.data
                      if isinstance(t.data, DataFile) else None, fields, field_spans, feed, loss, metrics, opt,
                      opt_args, schedule, scalars, groups, frozen, self.span(),
                      self.span("data", "file") if isinstance(t.data, DataFile) else None, scalar_inputs, lora,
                      self.optimizer_span, adapter_layers=adapters, prefix_layers=prefixes, random=random,
                      group_clips=tuple(g.clip for g in t.groups),
                      group_spans=tuple(self.span("groups", i) for i in range(len(t.groups))),
                      group_key_spans=tuple({k: self.key_span("groups", i, k) for k in opts} for i, (_, opts)
                                            in enumerate(groups)), tied=self.tied)

    def data(self) -> tuple[D.Generator | None, dict[str, Any], dict[str, D.FieldType], dict[str, Span]]:
        t = self.t
        if isinstance(t.data, DataFile):
            from .files import declared_fields

            fields, spans = declared_fields(t.data, self.doc, self.params, self.errors)
            return None, {}, fields, spans
        e = self.expression(t.data, "data")
        if e is None:
            return None, {}, {}, {}
        if not isinstance(e, A.Call) or e.func_name is None:
            self.errors.error(e.span, "data: expected a data set call such as arithmetic(digits=3), or "
                                      "{file: ..., fields: {...}}", f"data sets: {', '.join(D.GENERATORS)}")
            return None, {}, {}, {}
        gen = D.GENERATORS.get(e.func_name)
        if gen is None:
            self.errors.error(e.func.span, f"data: unknown data set '{e.func_name}'"
                              + did_you_mean(e.func_name, D.GENERATORS), f"data sets: {', '.join(D.GENERATORS)}")
            return None, {}, {}, {}
        if e.args:
            self.errors.error(e.args[0].span, f"data: give {gen.name}()'s arguments by name, e.g. "
                                              f"{next(iter(gen.defaults))}={next(iter(gen.defaults.values()))!r}")
        given, spans = {}, {}
        for k in e.kwargs:
            v = self.constant(k.value)
            if v is not _BAD:
                given[k.name], spans[k.name] = list(v) if isinstance(v, tuple) else v, k.span
        try:
            args = gen.bind(given)
        except D.ArgError as err:
            self.errors.error(spans.get(err.arg, e.span), f"data: {err}",
                              f"{gen.name}() takes {', '.join(f'{k}={v!r}' for k, v in gen.defaults.items())}")
            return gen, {}, {}, {}
        fields = gen.fields(args)
        return gen, args, fields, {k: e.span for k in fields}

    def shapes(self, fields: dict[str, D.FieldType], feed: dict[str, str], exprs: list[tuple[Any, str]],
               random: Mapping[str, RandomInput] | None = None, scalars: set[str] = frozenset()) -> None:
        """The loss and the metrics evaluated on shapes and dtypes (`shapes.abstract_eval`): every
        operator and function gets arguments it takes, the loss is a single float and each metric a
        single number. Checked on concrete sizes, the batch axis standing as a size no other axis has;
        what depends on values (a tensor index, a scalar that changes with the step) is left to the dry
        run that `specc train` makes first."""
        from specc.compiler.dims import evaluate
        from specc.compiler.ir import DTYPES

        from . import shapes as S

        inputs = {name: self.graph.node(nid).outputs[0] for name, nid in self.graph.inputs}
        bindings = dict(self.graph.example_bindings())
        batch = set()
        for name, source in feed.items():
            ty = inputs[name]
            if not ty.shape:
                continue
            batch.add(symbol_name(ty.shape[0]))
            for w, g in zip(ty.shape[1:], fields[source][1]):
                if symbol_name(w) is not None:
                    bindings[symbol_name(w)] = g
        if len(batch) != 1 or None in batch:
            return
        symbol = batch.pop()
        bindings[symbol] = BATCH
        with S.batch_named(symbol):  # messages name the batch axis as the spec does
            env: dict[str, Any] = dict(self.params)
            env.update({k: S.NUMBER for k in (*SCALAR_NAMES, *scalars)})
            env.update({k: S.Abstract((BATCH,) + shape, DTYPES[dtype]) for k, (dtype, shape, _) in fields.items()})
            env.update({k: S.Abstract((BATCH,) + r.shape, DTYPES[r.dtype]) for k, r in (random or {}).items()})
            for name, ref in self.graph.outputs:
                ty = self.graph.type_of(ref)
                try:
                    env[name] = S.Abstract(tuple(d if isinstance(d, int) else evaluate(d, bindings) for d in ty.shape),
                                           DTYPES[ty.dtype])
                except (KeyError, ValueError, TypeError):
                    env[name] = S.UNKNOWN

            for e, what in exprs:
                if e is None:
                    continue
                try:
                    value = S.abstract_eval(e, env)
                except ExprError as err:
                    self.errors.error(err.span, f"{what}: {err.message}")
                    continue
                single = isinstance(value, S.Abstract) and value.numel == 1
                if what == "loss" and value is not S.UNKNOWN and not (single and S.is_float(value.dtype)):
                    got = S.show(value.shape) if isinstance(value, S.Abstract) and not single else \
                        f"a single {value.dtype}" if isinstance(value, S.Abstract) else \
                        "a number that is not a tensor" if value is S.NUMBER or isinstance(value, (int, float)) \
                        else _kind(value)
                    self.errors.error(e.span, f"loss: expected a single float (a mean), got {got}",
                                      "reduce it, e.g. mean(...), or use a loss function such as cross_entropy")
                elif what != "loss" and isinstance(value, S.Abstract) and not single:
                    self.errors.error(e.span, f"{what}: expected a single number, got {S.show(value.shape)}",
                                      "reduce it, e.g. mean(...)")
                elif what != "loss" and (value is None or isinstance(value, (str, list))):
                    self.errors.error(e.span, f"{what}: expected a single number, got {_kind(value)}")

    def scalars(self) -> dict[str, A.Expr]:
        out: dict[str, A.Expr] = {}
        outputs = {name for name, _ in self.graph.outputs}
        for name, text in self.t.scalars.items():
            if name in outputs or name in self.params or name in SCALAR_NAMES:
                self.errors.error(self.key_span("scalars", name), f"scalars: '{name}' is already the name of "
                                                                  f"{'an output' if name in outputs else 'a param'}")
            e = self.expression(text, "scalars", name)
            if e is not None:
                self.scalar_expr(e, f"scalar '{name}'", ("scalars", name), extra=set(out))
                out[name] = e
        return out

    def scalar_expr(self, e: A.Expr, what: str, path: tuple, extra: set[str] = frozenset()) -> None:
        clock = Clock(max(1, self.t.steps or 1))
        functions = scalar_functions(clock)
        before = len(self.errors.diagnostics)
        self.names(e, set(self.params) | set(SCALAR_NAMES) | set(extra), functions, what)
        if len(self.errors.diagnostics) > before or extra & {s.id for s in walk(e) if isinstance(s, A.Name)}:
            return
        for step in (0, clock.steps - 1):  # the values at the ends, to catch bad arguments now
            clock.step = step
            try:
                v = _eval(e, {**self.params, **clock.env()}, functions)
            except ExprError as err:
                self.errors.error(err.span, f"{what}: {err.message}")
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.errors.error(e.span, f"{what}: expected a number, got {v!r}")
                return

    def feeds(self, fields: dict[str, D.FieldType], scalars: set[str]) -> tuple[dict[str, str], dict[str, str]]:
        feed: dict[str, str] = {}
        scalar_inputs: dict[str, str] = {}
        inputs = {name: self.graph.node(nid).outputs[0] for name, nid in self.graph.inputs}
        for name in self.t.feed:
            if name not in inputs:
                self.errors.error(self.key_span("feed", name), f"feed: '{name}' is not an input of the model"
                                  + did_you_mean(name, inputs), f"inputs: {', '.join(inputs)}")
        for name, ty in inputs.items():
            if name in self.t.random and name not in self.t.feed:
                continue  # drawn each step (a data field of its name is not used for it)
            source = self.t.feed.get(name, name)
            where = self.span("feed", name) if name in self.t.feed else self.span("data")
            if source in scalars:
                if ty.shape:
                    self.errors.error(where, f"feed: the scalar '{source}' can only feed an input without axes, "
                                             f"and '{name}' is {ty}")
                scalar_inputs[name] = source
                continue
            if source not in fields:
                if fields:
                    self.errors.error(where, f"the model input '{name}' is fed by no data field"
                                      + (f" (no field '{source}')" if name in self.t.feed else "")
                                      + did_you_mean(source, set(fields) | scalars),
                                      f"fields: {', '.join(fields)}; add feed: {{{name}: FIELD}}")
                continue
            dtype, shape, rng = fields[source]
            self.check_feed(name, ty, source, dtype, shape, rng, where)
            feed[name] = source
        return feed, scalar_inputs

    def randoms(self, fields: dict[str, D.FieldType], feed: dict[str, str],
                scalars: dict[str, A.Expr]) -> dict[str, RandomInput]:
        """train.random: each entry an input of the model, not also in feed:, drawn by a known draw whose
        kind fits the input's dtype, into a shape whose axes after the batch the params or the data fix;
        the draw's arguments are evaluated at the first and the last step (a subset larger than its axis
        is an error here)."""
        from specc.compiler.ir import FLOAT_DTYPES

        inputs = {name: self.graph.node(nid).outputs[0] for name, nid in self.graph.inputs}
        bindings: dict[str, int] = {}
        for name, source in feed.items():
            for w, g in zip(inputs[name].shape[1:], fields[source][1]):
                if symbol_name(w) is not None:
                    bindings[symbol_name(w)] = g
        batch = {symbol_name(inputs[n].shape[0]) for n in feed if inputs[n].shape}
        dims = {k: v for k, v in bindings.items() if k not in batch}
        clock = Clock(max(1, self.t.steps or 1))
        fns = scalar_functions(clock)
        out: dict[str, RandomInput] = {}
        for name, text in self.t.random.items():
            if name not in inputs:
                self.errors.error(self.key_span("random", name), f"random: '{name}' is not an input of the model"
                                  + did_you_mean(name, inputs), f"inputs: {', '.join(inputs)}")
                continue
            if name in self.t.feed:
                self.errors.error(self.key_span("random", name), f"random: the input '{name}' is also fed by "
                                                                 f"feed: ({self.t.feed[name]}); give it one source")
                continue
            e = self.expression(text, "random", name)
            if e is None:
                continue
            what = f"random '{name}'"
            if not isinstance(e, A.Call) or e.func_name not in DRAWS:
                fname = e.func_name if isinstance(e, A.Call) else None
                self.errors.error(e.func.span if fname else e.span,
                                  f"{what}: " + (f"unknown draw '{fname}'" + did_you_mean(str(fname), DRAWS)
                                                 if fname else "expected a draw"),
                                  "draws: subset(k) or subset(ratio=r), bernoulli(p), uniform(lo, hi), "
                                  "normal(mean, std)")
                continue
            before = len(self.errors.diagnostics)
            self.names(e, set(self.params) | set(SCALAR_NAMES) | set(scalars) | set(dims), {**fns, **DRAWS}, what)
            ty = inputs[name]
            kind = "bool" if ty.dtype == "bool" else "float" if ty.dtype in FLOAT_DTYPES else ty.dtype
            if kind not in DRAW_KINDS[e.func_name]:
                fits = [d for d, kinds in DRAW_KINDS.items() if kind in kinds]
                self.errors.error(e.span, f"{what}: the input is {ty}, and {e.func_name}() draws "
                                          f"{' or '.join(DRAW_KINDS[e.func_name])} values"
                                  + (f" ({kind} inputs take {' or '.join(fits)})" if fits else
                                     f" (no draw makes {kind} values)"))
            shape = self.random_shape(name, ty, batch, bindings)
            if len(self.errors.diagnostics) > before or shape is None:
                continue
            for step in sorted({0, clock.steps - 1}):  # the arguments at the ends, to catch bad ones now
                clock.step = step
                env = self.scalar_env(clock, fns, scalars)
                if env is None:
                    break
                env.update(dims)
                try:
                    problem = sampler(e, env, fns).problem(shape)
                except ExprError as err:  # at the last step too: subset(16 - step) fails only late
                    self.errors.error(err.span, f"{what}: {err.message}" + (f" at step {step}" if step else ""))
                    break
                if problem:
                    self.errors.error(e.span, f"{what}: {problem}" + (f" at step {step}" if step else ""))
                    break
            out[name] = RandomInput(e, shape, ty.dtype, dims)
        return out

    def random_shape(self, name, ty, batch: set, bindings: dict[str, int]) -> tuple[int, ...] | None:
        """The shape of one sample of a drawn input: its axes after the batch, as the params or the data
        fix them (None, with an error, when they do not)."""
        from specc.compiler.dims import evaluate

        where = self.span("random", name)
        first = symbol_name(ty.shape[0]) if ty.shape else None
        if first is None or (batch and first not in batch):
            axis = "no axes" if not ty.shape else f"first axis {ty.shape[0]}"
            want = f" {next(iter(batch))}" if len(batch) == 1 and None not in batch else ""
            self.errors.error(where, f"random: the input '{name}' is {ty}: a draw fills an input whose first axis "
                                     f"is the batch{want}, and it has {axis}")
            return None
        shape = []
        for i, d in enumerate(ty.shape[1:], start=1):
            try:
                shape.append(d if isinstance(d, int) else int(evaluate(d, bindings)))
            except (KeyError, ValueError, TypeError):
                self.errors.error(where, f"random: the input '{name}' is {ty}: the size of axis {i} ({d}) is fixed "
                                         f"by no param or data field (feed an input that has it)")
                return None
        return tuple(shape)

    def scalar_env(self, clock: Clock, fns: Mapping[str, Function], scalars: dict[str, A.Expr]) -> dict | None:
        """params, step, steps, progress and the scalars at the clock's step (None: a scalar fails, which
        `scalars()` reports)."""
        env: dict[str, Any] = {**self.params, **clock.env()}
        for n, se in scalars.items():
            try:
                env[n] = float(_eval(se, env, fns))
            except (ExprError, TypeError, ValueError):
                return None
        return env

    def check_feed(self, name, ty, source, dtype, shape, rng, where) -> None:
        from specc.compiler.ir import FLOAT_DTYPES

        if (ty.dtype in FLOAT_DTYPES) != (dtype in FLOAT_DTYPES) or (ty.dtype == "bool") != (dtype == "bool"):
            self.errors.error(where, f"the input '{name}' is {ty} but the field '{source}' holds {dtype}")
            return
        want = ty.shape[1:]
        if len(want) != len(shape):
            self.errors.error(where, f"the input '{name}' is {ty}: {len(want)} axes after the batch, but the field "
                                     f"'{source}' has {len(shape)} per sample ({list(shape)})")
            return
        for i, (w, g) in enumerate(zip(want, shape)):
            if isinstance(w, int) and w != g:
                self.errors.error(where, f"the input '{name}' is {ty}: axis {i + 1} is {w}, the field '{source}' "
                                         f"has {g}")
            symbol = symbol_name(w)
            if symbol in self.graph.dims:
                _, lo, hi = self.graph.dims[symbol]
                if g < lo or (hi is not None and g > hi):
                    self.errors.error(where, f"the input '{name}' is {ty} with {symbol} in [{lo}, "
                                             f"{'any' if hi is None else hi}], but the field '{source}' has {g} "
                                             f"on that axis")
        if ty.value_range is not None and rng is not None and (rng[0] < ty.value_range[0] or
                                                                rng[1] > ty.value_range[1]):
            self.errors.error(where, f"the input '{name}' takes values in range{ty.value_range}, the field "
                                     f"'{source}' has values in range{rng}")

    def optimizer(self) -> tuple[str, dict[str, Any]]:
        e = self.expression(self.t.optimizer, "optimizer")
        if e is None:
            return "", {}
        self.optimizer_span = e.span
        if not isinstance(e, A.Call) or e.func_name is None or e.args:
            self.errors.error(e.span, "optimizer: expected a call with named arguments, e.g. adamw(lr=0.001)")
            return "", {}
        name = e.func_name.lower()
        if name in UNSUPPORTED:
            self.errors.error(e.func.span, f"optimizer: {UNSUPPORTED[name]}; choose another optimizer")
            return "", {}
        if name not in OPTIMIZERS:
            self.errors.error(e.func.span, f"optimizer: unknown optimizer '{e.func_name}'"
                              + did_you_mean(name, OPTIMIZERS), f"torch.optim has {', '.join(sorted(OPTIMIZERS))}")
            return "", {}
        cls_name, allowed = OPTIMIZERS[name]
        args = {}
        for k in e.kwargs:
            if k.name not in allowed:
                self.errors.error(k.span, f"optimizer: {cls_name} has no argument '{k.name}'"
                                  + did_you_mean(k.name, allowed), f"arguments: {', '.join(sorted(allowed))}")
                continue
            v = self.constant(k.value)
            if v is _BAD:
                continue
            problem = argument_problem(k.name, v)
            if problem:
                self.errors.error(k.span, f"optimizer: {problem}")
            args[k.name] = v
        return cls_name, args

    def groups(self, opt: str, extra_names: frozenset[str] = frozenset()) -> list[tuple[list[str], dict[str, Any]]]:
        """Each entry's patterns (each must match a parameter: the spec's, or one that `lora:`, `adapters:`
        or `prefix:` adds, `extra_names`) and optimizer arguments, whose values must be what the optimizer
        itself may take (`argument_problem`: torch checks only the optimizer's own arguments, so a group's
        lr of -1 would train by gradient ascent)."""
        names = {**parameter_names(self.graph), **dict.fromkeys(extra_names, True)}
        allowed = set(OPTIMIZERS[opt.lower()][1]) if opt else set()
        out = []
        for i, g in enumerate(self.t.groups):
            patterns = [g.params] if isinstance(g.params, str) else list(g.params)
            for j, p in enumerate(patterns):
                path = ("groups", i, "params") + ((j,) if not isinstance(g.params, str) else ())
                chosen = select(p, names, self.tied)
                if chosen.partial:
                    self.errors.error(self.span(*path), *partial_tie_message("groups", p, chosen.partial, self.tied))
                elif not chosen.hits:
                    self.errors.error(self.span(*path), f"groups: '{p}' matches no parameter",
                                      _close_params(p, names, self.tied))
            extra = dict(g.model_extra or {})
            for k, v in extra.items():
                if opt and k not in allowed:
                    self.errors.error(self.key_span("groups", i, k), f"groups: {opt} has no argument '{k}'"
                                      + did_you_mean(k, allowed))
                elif k not in FLAGS and not (_plain_number(v) or (isinstance(v, list) and v and
                                                                  all(_plain_number(x) for x in v))):
                    got = str(v).lower() if isinstance(v, bool) else repr(v)
                    self.errors.error(self.span("groups", i, k), f"groups: '{k}' must be a number (or a list of "
                                                                 f"numbers, e.g. betas), got {got}")
                elif problem := argument_problem(k, v):  # the values the optimizer's own arguments may take
                    self.errors.error(self.key_span("groups", i, k), f"groups: {problem}")
            out.append((patterns, {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}))
        return out

    def trained(self, frozen: frozenset[str], lora: tuple[str, ...], peft: bool) -> list[str] | None:
        """The names of the parameters training will update, in the names the groups' patterns match: the
        spec's trainable ones not frozen, or, with lora:, adapters: or prefix: (which freeze the spec's),
        the ones they add. None: unknown, since the adapters' transform was not made (an error is)."""
        if peft and self.peft_graph is None:
            return None
        if lora or peft:
            names = [f"{path}.{ab}" for path in lora for ab in ("lora_A", "lora_B")]
            if self.peft_graph is not None:
                base = parameter_names(self.graph)
                names += [n for n, trainable in parameter_names(self.peft_graph).items()
                          if trainable and n not in base]
            return names
        return [n for n, trainable in parameter_names(self.graph).items() if trainable and n not in frozen]

    def held_groups(self, groups: list[tuple[list[str], dict[str, Any]]], trained: list[str] | None,
                    wholesale: bool) -> None:
        """Each group holds a trainable parameter: the ones whose first matching group it is. One that holds
        none would set its optimizer arguments, or clip, for nothing (its parameters all taken by earlier
        groups, or frozen): an error, at its clip when it has one, else at the group. wholesale: lora:,
        adapters: or prefix: freeze every parameter of the spec, so a group written for training the spec
        itself (`{params: "*.bias", weight_decay: 0}`) may stay when one is added; only its clip is an error."""
        if trained is None:
            return
        every = self.every_name(set(parameter_names(self.graph)) | set(trained))
        lines = [self.span("groups", i).line for i in range(len(groups))]
        for i, (patterns, args) in enumerate(groups):
            if not all(fnmatch.filter(every, p) for p in patterns):
                continue  # a pattern that matches no parameter is an error of its own
            mine = [n for n in trained if group_index(n, [(patterns, {})], self.tied) is not None]
            owners = [group_index(n, groups, self.tied) for n in mine]
            if i in owners:
                continue
            if wholesale and not owners and self.t.groups[i].clip is None:
                continue
            earlier = sorted({lines[j] for j in owners if j is not None})
            why = (f"the trainable ones it matches belong to the group{'s' if len(earlier) > 1 else ''} on "
                   f"line{'s' if len(earlier) > 1 else ''} {', '.join(map(str, earlier))}" if earlier
                   else "every parameter it matches is frozen")
            via = [(a, n) for n in mine if group_index(n, [(patterns, {})]) is None
                   for a in self.tied.get(n, ()) if any(fnmatch.fnmatchcase(a, p) for p in patterns)]
            if earlier and via:  # matched through a tied name: say that it is the other group's tensor
                why += f" ({via[0][0]} is tied to {via[0][1]}: the same tensor)"
            rule = "each parameter belongs to the first group that matches it; frozen ones to none"
            if self.t.groups[i].clip is not None:
                self.errors.error(self.key_span("groups", i, "clip"),
                                  f"groups: clip: the group holds no trainable parameter ({rule}), so it would clip "
                                  f"nothing: {why}")
            else:
                what = f"its {', '.join(args)} would apply" if args else "it would apply"
                self.errors.error(self.span("groups", i),
                                  f"groups: the group holds no trainable parameter ({rule}), so {what} to nothing: "
                                  f"{why}", "put it before the group that takes its parameters, or narrow that "
                                            "group's patterns" if earlier else None)

    def booleans(self) -> None:
        """Numbers given as true or false: YAML's booleans pass pydantic's number fields as 1 and 0, so
        `clip: true` would clip to norm 1 and `steps: true` train one step; a number is asked for."""
        raw = self.doc.data.get("train")
        if not isinstance(raw, dict):
            return
        paths = [(k,) for k in ("clip", "split", "seed", "steps", "epochs", "batch")]
        paths += [("eval", "every"), ("checkpoint", "every"), ("checkpoint", "keep"), ("lora", "rank"),
                  ("lora", "alpha"), ("adapters", "bottleneck"), ("adapters", "scale"), ("prefix", "length")]
        groups = raw.get("groups")
        paths += [("groups", i, "clip") for i in range(len(groups) if isinstance(groups, list) else 0)]
        for path in paths:
            value = raw
            for key in path:
                value = value.get(key) if isinstance(value, dict) else value[key] if isinstance(value, list) \
                    else None
            if isinstance(value, bool):
                self.errors.error(self.span(*path), f"train.{'.'.join(map(str, path))}: expected a number, got "
                                                    f"{str(value).lower()}")

    def every_name(self, names) -> set[str]:
        """`names` and the names tied to them: every name a pattern may match."""
        return set(names) | {a for n in names for a in self.tied.get(n, ())}

    def frozen(self) -> frozenset[str]:
        """The stored parameters the recipe's `freeze:` patterns select (`select`: a tied name selects the
        tensor it is tied to; naming some of its names only is an error)."""
        names = parameter_names(self.graph)
        out: set[str] = set()
        for i, p in enumerate(self.t.freeze):
            chosen = select(p, names, self.tied)
            if chosen.partial:
                self.errors.error(self.span("freeze", i), *partial_tie_message("freeze", p, chosen.partial, self.tied))
            elif not chosen.hits:
                self.errors.error(self.span("freeze", i), f"freeze: '{p}' matches no parameter",
                                  _close_params(p, names, self.tied))
            out.update(chosen.hits)
        return frozenset(out)


    def lora(self) -> tuple[str, ...]:
        if self.t.lora is None:
            return ()
        from .lora import linear_layers

        layers = linear_layers(self.graph)
        hits: dict[str, None] = {}
        for i, p in enumerate(self.t.lora.layers):
            found = fnmatch.filter(layers, p)
            if not found:
                self.errors.error(self.span("lora", "layers", i), f"lora: '{p}' matches no linear layer",
                                  _close_params(p, layers))
            hits.update(dict.fromkeys(found))
        if not self.t.lora.layers:
            self.errors.error(self.span("lora"), "lora: name at least one linear layer in layers")
        return tuple(hits)

    def peft(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The layers of train.adapters and of train.prefix; the transform is tried here, so a layer that
        cannot take one is an error at its pattern."""
        from .peft import ADAPTER_OPS, PREFIX_OPS, PeftError, layers, transform

        t = self.t
        used = [k for k in ("lora", "adapters", "prefix") if getattr(t, k) is not None]
        if used and t.freeze:
            self.errors.error(self.key_span("freeze"), f"train: {' and '.join(used)} freeze"
                                                       f"{'s' if len(used) == 1 else ''} every parameter of the "
                                                       f"model already; drop freeze")
        found: dict[str, tuple[str, ...]] = {}
        patterns: dict[str, list[tuple[int, str]]] = {}
        for key, ops, what in (("adapters", ADAPTER_OPS, "linear, attention or mlp layer"),
                               ("prefix", PREFIX_OPS, "attention layer")):
            decl = getattr(t, key)
            if decl is None:
                found[key] = ()
                continue
            names = layers(self.graph, ops)
            hits: dict[str, None] = {}
            for i, p in enumerate(decl.layers):
                matched = fnmatch.filter(names, p)
                if not matched:
                    self.errors.error(self.span(key, "layers", i), f"{key}: '{p}' matches no {what}",
                                      _close_layers(p, names, what))
                hits.update(dict.fromkeys(matched))
                patterns.setdefault(key, []).extend((i, m) for m in matched)
            if not decl.layers:
                self.errors.error(self.span(key), f"{key}: name at least one {what} in layers")
            found[key] = tuple(hits)
        if (found["adapters"] or found["prefix"]) and not self.errors:
            a, pre = t.adapters, t.prefix
            try:
                self.peft_graph = transform(self.graph, list(found["adapters"]), a.bottleneck if a else 16,
                                            a.kind if a else "houlsby", a.scale if a else None,
                                            list(found["prefix"]), pre.length if pre else 8)
            except PeftError as e:
                key = e.key
                i = next((i for i, m in patterns.get(key, []) if m == e.layer), None)
                where = self.span(key, "layers", i) if i is not None else self.span(key)
                self.errors.error(where, f"{key}: {e.message}")
        return found["adapters"], found["prefix"]


class _Bad:
    pass


_BAD = _Bad()


#: The size the batch axis stands as when shapes are checked: one no other axis is likely to have.
BATCH = 999_983


def _plain_number(v: Any) -> bool:
    """A number that is not a boolean (YAML's true is no 1 here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_callee(root: A.Expr, name: A.Name) -> bool:
    return any(isinstance(s, A.Call) and s.func is name for s in walk(root))


def _close_layers(pattern: str, names, what: str) -> str:
    import difflib

    if not names:
        return f"the model has no {what}"
    close = difflib.get_close_matches(pattern, sorted(names), n=3, cutoff=0.4)
    return f"close names: {', '.join(close)}" if close else f"layers: {', '.join(sorted(names)[:10])}"


def _close_params(pattern: str, names, tied: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """Close names among `names` and the names tied to them, else the first (stored) names."""
    import difflib

    every = set(names) | {a for n in names for a in (tied or {}).get(n, ())}
    close = difflib.get_close_matches(pattern, sorted(every), n=3, cutoff=0.4)
    return f"close names: {', '.join(close)}" if close else f"parameters: {', '.join(sorted(names)[:10])}"
