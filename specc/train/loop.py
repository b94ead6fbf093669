"""The training loop: a checked recipe run on the PyTorch backend's built module.

The model is the -O0 build of the spec (the very code `specc build` writes), so parameter names are
the spec's (`specc ir -O0`); with `adapters:` or `prefix:` it is the build of the spec's graph with
those layers inserted (`peft.py`), and so is RUN/model/. Everything that decides a step is a
function of the seed and the step number (the data order: one seeded permutation per epoch; the
schedules: a factor per step; the draws of `random:` inputs: a generator seeded by the seed, the
input's name and the step, drawn for the global batch, of which each process takes its rows;
evaluation has draws of its own, the same at every evaluation), and the rest (weights, optimizer
state, the RNG of dropout) is in every checkpoint, so a run resumed from step k gives the same losses
as the run never stopped.
Files of a run directory:

    metrics.jsonl            one JSON line per step ({"step", "loss", "lr", scalars}) and per evaluation
                             ({"step", "split": "val", "loss", metrics}); a value that is not finite (a
                             metric's NaN, an infinite scalar) is written as null, so every line is JSON
    checkpoints/step-NNNNNNN/  model.safetensors + state.pt (optimizer, RNG, step), written to a
                             temporary folder and renamed, so an interrupted write leaves no checkpoint
    model/                   a `specc build` output (-O1) of the trained weights
    summary.json             steps, wall time, the last evaluation (non-finite values as null too)

The folder is made only once the loss is known to be finite at the starting weights (the dry run on
one batch, the step-0 evaluation and the first step's loss, all before any update): a loss that is
NaN from the start is an error that writes nothing, as a bad loss expression is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from specc.compiler.ir import Graph
from specc.compiler.passes import PassContext
from specc.dsl.diagnostics import Diagnostic, Span, SpecError
from specc.dsl.schema import SpecSource

from . import data as D
from .expr import GLOBAL_SUM, TENSOR_FUNCTIONS, Clock, ExprError, evaluate, sampler, scalar_functions
from .recipe import Recipe, group_index, optimizers
from .rundir import CHECKPOINTS, MODEL, check_run, run_inputs, same_folder

#: Validation splits up to this many samples are evaluated in one pass.
EVAL_CHUNK = 4096
#: A larger split's outputs are gathered whole (exact metrics) up to this size, else averaged over chunks.
EVAL_GATHER_BYTES = 1 << 30


def chunked_note() -> str:
    """What a run says when its validation metrics were averaged over chunks (Stepper.evaluate)."""
    return (f"the validation loss and metrics are means over chunks of {EVAL_CHUNK} samples weighted by their "
            f"sizes (an output has no sample axis, or the split's outputs exceed {EVAL_GATHER_BYTES >> 20} MiB): "
            f"exact for plain means over samples, not for masked means or nonlinear metrics")


_TORCH = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
          "i8": torch.int8, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8, "bool": torch.bool}


@dataclass
class Result:
    """What a run reached."""

    steps: int
    loss: float
    metrics: dict[str, float]
    seconds: float
    out: Path
    stopped: bool = False  # stopped early by `until`


@dataclass(frozen=True)
class Dist:
    """This process's place in a torch.distributed run (world 1: a plain run)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


# -- data -----------------------------------------------------------------------------------

def load_data(recipe: Recipe) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The (train, validation) splits of the recipe's data as tensors."""
    t = recipe.section
    if recipe.generator is not None:
        try:
            arrays = D.generate(recipe.generator, recipe.data_args, t.seed)
        except D.ArgError as e:
            where = next(iter(recipe.field_spans.values()), recipe.span)  # the data set's call
            raise SpecError(Diagnostic(where, f"data: {e}"), recipe.sources) from None
    else:
        from .files import load

        arrays = load(recipe)
    arrays = {k: arrays[k] for k in recipe.fields}
    n = len(next(iter(arrays.values())))
    n_val = int(round(t.split * n))
    if recipe.ordered:
        gap = recipe.generator.gap(recipe.data_args) if recipe.generator is not None and n_val else 0
        order = np.arange(n)
        val_idx, train_idx = order[n - n_val:], order[:max(0, n - n_val - gap)]
    else:
        order = np.random.default_rng(t.seed + 1).permutation(n)
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(_TORCH[recipe.fields[k][0]]) for k, v in arrays.items()}
    train = {k: v[torch.from_numpy(train_idx)] for k, v in tensors.items()}
    val = {k: v[torch.from_numpy(val_idx)] for k, v in tensors.items()}
    return train, val


class Batches:
    """The batch of every step: epoch e's order is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch: int, seed: int, dist: Dist):
        self.n, self.batch, self.seed, self.dist = n, batch, seed, dist
        self.per_epoch = n // batch
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        idx = self._perm[i * self.batch:(i + 1) * self.batch]
        share = self.batch // self.dist.world
        return idx[self.dist.rank * share:(self.dist.rank + 1) * share]


# -- the model --------------------------------------------------------------------------------

def build_model(src: SpecSource, graph: Graph, recipe: Recipe, base: Graph | None = None) -> torch.nn.Module:
    """The -O0 module in training mode, with the recipe's frozen parameters frozen too.

    base: the spec's own graph when `graph` is its transform by the recipe's adapters and prefixes
    (`peft.of_recipe`): the base parameters then start as the spec's seed makes them."""
    from specc.backends.pytorch.build import artifacts, load_in_memory

    weights = None
    if base is not None and base is not graph:
        from .peft import initial_weights

        weights = initial_weights(base, graph, recipe.section.seed)
    model = load_in_memory(artifacts(graph, src.text, src.file, src.spec.paper, src.spec.description,
                                     weights=weights, ctx=PassContext(opt_level=0)))
    for name, p in model.named_parameters():
        if name in recipe.frozen:
            p.requires_grad_(False)
    if recipe.lora_layers:
        from .lora import inject

        lora = recipe.section.lora
        inject(model, list(recipe.lora_layers), lora.rank, lora.alpha or float(lora.rank), recipe.section.seed)
    model.train()
    return model


def weight_names(graph: Graph, recipe: Recipe | None = None) -> list[str]:
    """The stored tensors (parameters and buffers, tied ones once, at their owner; LoRA's A and B).
    Of the graph that is trained: with adapters and prefixes, `peft.of_recipe`'s."""
    names = [".".join(n.path + (p.name,)) for _, n in graph.nodes() for p in n.params if p.tied_to is None]
    for path in recipe.lora_layers if recipe is not None else ():
        names += [f"{path}.lora_A", f"{path}.lora_B"]
    return names


def _group_of(model: torch.nn.Module, recipe: Recipe) -> list[tuple[torch.nn.Parameter, int | None]]:
    """Every trainable parameter, in the model's order, with the index of the first group of the recipe
    whose patterns match its name (None: no group)."""
    return [(p, group_index(name, recipe.groups, recipe.tied)) for name, p in model.named_parameters()
            if p.requires_grad]


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    cls = optimizers()[recipe.optimizer.lower()]
    groups: list[dict[str, Any]] = [{"params": [], **opts} for _, opts in recipe.groups]
    rest: list[torch.nn.Parameter] = []
    for p, i in _group_of(model, recipe):
        (rest if i is None else groups[i]["params"]).append(p)
    groups = [g for g in groups if g["params"]]
    if rest:
        groups.insert(0, {"params": rest})
    if not groups:
        raise SpecError(Diagnostic(recipe.span, "train: no parameter is left to train (all are frozen)"),
                        recipe.sources)
    try:  # torch checks the values (betas in [0, 1), ...)
        opt = cls(groups, **recipe.optimizer_args)
    except (ValueError, TypeError) as e:
        raise SpecError(Diagnostic(recipe.optimizer_span or recipe.span, f"optimizer: {recipe.optimizer}: {e}"),
                        recipe.sources) from None
    for i, (_, opts) in enumerate(recipe.groups):  # torch checks only the optimizer's own arguments: a
        held = [p for p, j in _group_of(model, recipe) if j == i]  # group's go through the same constructor
        if not opts or not held:
            continue
        problem = _constructor_problem(cls, held, {**recipe.optimizer_args, **opts})
        if problem:  # located at the argument that alone fails (else the group: a combination does)
            key = next((k for k in opts if _constructor_problem(cls, held, {**recipe.optimizer_args, k: opts[k]})),
                       None)
            spans = recipe.group_key_spans[i] if i < len(recipe.group_key_spans) else {}
            where = spans.get(key) or (recipe.group_spans[i] if i < len(recipe.group_spans) else recipe.span)
            raise SpecError(Diagnostic(where, f"groups: {recipe.optimizer}: {problem}"), recipe.sources)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def _constructor_problem(cls: type, params: list, args: dict[str, Any]) -> str | None:
    """What torch's optimizer constructor says of `args` (None: it takes them); nothing is stepped."""
    try:
        cls(params, **args)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def clip_sets(model: torch.nn.Module, recipe: Recipe) -> list[tuple[list[torch.nn.Parameter], float]]:
    """(parameters, max norm) of each gradient-norm clip of a step: every group with a `clip:` of its
    own alone, then all other trainable parameters (of the other groups and of none) together under
    train.clip (none when it is not given)."""
    clips = recipe.group_clips or (None,) * len(recipe.groups)
    sets: dict[int, list[torch.nn.Parameter]] = {}
    rest: list[torch.nn.Parameter] = []
    for p, i in _group_of(model, recipe):
        (rest if i is None or clips[i] is None else sets.setdefault(i, [])).append(p)
    out = [(sets[i], float(clips[i])) for i in sorted(sets)]
    if recipe.section.clip is not None and rest:
        out.append((rest, float(recipe.section.clip)))
    return out


def draw_inputs(recipe: Recipe, step: int, steps: int, scalars: dict[str, float], n: int,
                rows: slice = slice(None), fixed: bool = False) -> dict[str, torch.Tensor]:
    """The `random:` inputs (on the CPU) of `n` samples at `step` of `steps`, their rows `rows`: a
    function of the seed, the input and the step alone, so a resumed run draws what the uninterrupted
    one did, and each process of a distributed run takes its rows of the global batch's draw. fixed:
    evaluation's draws, the same at every step (the arguments are still evaluated at `step`, with
    `scalars`; a calibration batch can use them too). Raises SpecError, located at the draw, when its
    arguments fail at this step."""
    if not recipe.random:
        return {}
    clock = Clock(steps)
    clock.step = step
    env = {**recipe.params, **clock.env(), **scalars}
    fns = scalar_functions(clock)
    out = {}
    for name, r in recipe.random.items():
        try:
            s = sampler(r.draw, {**env, **r.dims}, fns)
        except ExprError as e:
            raise SpecError(Diagnostic(e.span, f"random '{name}': {e.message}" + (f" at step {step}" if step else "")),
                            recipe.sources) from None
        problem = s.problem(r.shape)
        if problem:
            raise SpecError(Diagnostic(r.draw.span, f"random '{name}': {problem} at step {step}"), recipe.sources)
        gen = random_generator(recipe.section.seed, name, None if fixed else step)
        out[name] = s.draw(gen, (n,) + r.shape, _TORCH[r.dtype])[rows]
    return out


def random_generator(seed: int, name: str, step: int | None) -> torch.Generator:
    """The (CPU) generator of the draw of input `name` at `step`; step None: the fixed draws of evaluation."""
    key = f"{seed}/{name}/{'eval' if step is None else step}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


# -- one step -------------------------------------------------------------------------------

class Stepper:
    """Forward, loss and metrics of the recipe on a batch."""

    def __init__(self, model, graph: Graph, recipe: Recipe, steps: int):
        self.model, self.graph, self.recipe = model, graph, recipe
        self.device = next(model.parameters()).device
        self.inputs = [name for name, _ in graph.inputs]
        self.outputs = [name for name, _ in graph.outputs]
        self.clock = Clock(steps)
        self.scalar_fns = scalar_functions(self.clock)
        self.chunked = False  # an evaluation averaged its metrics over chunks of the split (see evaluate)

    def scalars(self, step: int) -> dict[str, float]:
        self.clock.step = step
        env: dict[str, Any] = {**self.recipe.params, **self.clock.env()}
        out: dict[str, float] = {}
        for name, e in self.recipe.scalars.items():
            out[name] = env[name] = float(evaluate(e, env, self.scalar_fns, self.recipe.sources))
        return out

    def lr_factor(self, step: int) -> float:
        if self.recipe.schedule is None:
            return 1.0
        self.clock.step = step
        return float(evaluate(self.recipe.schedule, {**self.recipe.params, **self.clock.env()}, self.scalar_fns,
                              self.recipe.sources))

    def draws(self, step: int, scalars: dict[str, float], n: int, rows: slice = slice(None),
              fixed: bool = False) -> dict[str, torch.Tensor]:
        """The `random:` inputs of `n` samples (the global batch) at `step`, their rows `rows` (this
        process's share), on the model's device: see `draw_inputs`."""
        drawn = draw_inputs(self.recipe, step, self.clock.steps, scalars, n, rows, fixed)
        return {k: v.to(self.device) for k, v in drawn.items()}

    def forward(self, model, batch: dict[str, torch.Tensor], scalars: dict[str, float],
                drawn: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        args = []
        for name in self.inputs:
            if name in self.recipe.scalar_inputs:
                args.append(torch.tensor(scalars[self.recipe.scalar_inputs[name]], device=self.device))
            elif name in self.recipe.random:
                args.append(drawn[name])
            else:
                args.append(batch[self.recipe.feed[name]])
        try:
            result = model(*args)
        except (RuntimeError, ValueError, IndexError) as e:
            raise SpecError(Diagnostic(self.recipe.span, f"train: the model failed on a batch of the data: "
                                                         f"{str(e).splitlines()[0]}"), self.recipe.sources) from None
        result = result if isinstance(result, tuple) else (result,)
        return dict(zip(self.outputs, result))

    def env(self, batch, outputs, scalars, step: int, drawn: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The names of the loss and the metrics; a drawn input's name means its draw (not a data field's)."""
        self.clock.step = step
        return {**self.recipe.params, **self.clock.env(), **scalars, **batch, **(drawn or {}), **outputs}

    def loss(self, env: dict[str, Any]) -> torch.Tensor:
        value = evaluate(self.recipe.loss, env, TENSOR_FUNCTIONS, self.recipe.sources)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise SpecError(Diagnostic(self.recipe.loss.span, f"loss: expected a single number (a mean), got "
                                                              f"{shape}"), self.recipe.sources)
        return value.reshape(())

    @torch.no_grad()
    def evaluate(self, model, val: dict[str, torch.Tensor], step: int, scalars: dict[str, float],
                 chunk: int, gather_bytes: int | None = None) -> dict[str, float]:
        """The loss and the metrics on the validation split, in eval mode. A split of more than `chunk`
        samples runs through the model `chunk` samples at a time; the outputs are concatenated along the
        sample axis and the loss and the metrics computed once, on the whole split, so that a masked mean,
        a ratio or a root of a mean is what one pass would give. When an output has no sample axis (its
        type's first dimension is not the inputs'), or the outputs of the whole split would take more than
        `gather_bytes` (EVAL_GATHER_BYTES), they are the mean over chunks weighted by their sizes instead:
        exact for plain means over samples only; `self.chunked` says so."""
        was = model.training
        model.eval()
        n = len(next(iter(val.values())))
        drawn_all = self.draws(step, scalars, n, fixed=True)
        try:
            if n <= chunk:
                return self._measure(self.env(val, self.forward(model, val, scalars, drawn_all), scalars, step,
                                              drawn_all))
            parts: list[dict[str, torch.Tensor]] = []
            gathered = self._sample_major_outputs()
            limit = EVAL_GATHER_BYTES if gather_bytes is None else gather_bytes
            for i in range(0, n, chunk):
                part = {k: v[i:i + chunk] for k, v in val.items()}
                drawn = {k: v[i:i + chunk] for k, v in drawn_all.items()}
                outputs = self.forward(model, part, scalars, drawn)
                rows = len(next(iter(part.values())))
                gathered = gathered and all(isinstance(v, torch.Tensor) and v.dim() >= 1 and len(v) == rows
                                            for v in outputs.values())
                if gathered and i == 0:
                    gathered = sum(v.element_size() * v.numel() for v in outputs.values()) * n // rows <= limit
                if not gathered:
                    self.chunked = True
                    return self._weighted(model, val, drawn_all, scalars, step, chunk)
                parts.append(outputs)
            outputs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            return self._measure(self.env(val, outputs, scalars, step, drawn_all))
        finally:
            model.train(was)

    def _sample_major_outputs(self) -> bool:
        """Whether every output's first dimension is the sample axis of the inputs the data feeds."""
        fed = set(self.recipe.feed) | set(self.recipe.random)
        g = self.graph
        ins = [g.node(nid).outputs[0] for name, nid in g.inputs if name in fed]
        axes = {t.shape[0] for t in ins if t.rank >= 1}
        outs = [g.type_of(ref) for _, ref in g.outputs]
        return bool(axes) and all(t.rank >= 1 and t.shape[0] in axes for t in outs)

    def _weighted(self, model, val: dict[str, torch.Tensor], drawn_all: dict[str, torch.Tensor],
                  scalars: dict[str, float], step: int, chunk: int) -> dict[str, float]:
        """The loss and the metrics of each chunk, their mean weighted by the chunks' sizes."""
        n = len(next(iter(val.values())))
        totals: dict[str, float] = {}
        for i in range(0, n, chunk):
            part = {k: v[i:i + chunk] for k, v in val.items()}
            drawn = {k: v[i:i + chunk] for k, v in drawn_all.items()}
            outputs = self.forward(model, part, scalars, drawn)
            for name, value in self._measure(self.env(part, outputs, scalars, step, drawn)).items():
                totals[name] = totals.get(name, 0.0) + value * len(next(iter(part.values())))
        return {k: v / n for k, v in totals.items()}

    def not_finite(self, value: float, where: str) -> SpecError:
        """The error of a loss that is not finite before any update: at the starting weights, so neither
        the learning rate nor the gradients' size is the cause; the data, the loss, or a drawn input is
        (an empty subset masks every key, and a softmax over no key is NaN)."""
        drawn = list(self.recipe.random)
        hint = (f"; the inputs drawn by random: ({', '.join(drawn)}) take part: a draw can leave nothing to attend "
                f"to or average over (an empty subset masks every key)" if drawn else "")
        return SpecError(Diagnostic(self.recipe.loss.span, f"loss: not finite ({value}) at the initial weights, "
                                                           f"before any update ({where}){hint}"), self.recipe.sources)

    @torch.no_grad()
    def dry_run(self, model, train: dict[str, torch.Tensor], val: dict[str, torch.Tensor], batch: int,
                initial: bool = False) -> None:
        """The loss and every metric on one batch, in eval mode (no dropout, no RNG drawn). initial: the
        weights are the starting ones, so a loss that is not finite is an error already."""
        was = model.training
        model.eval()
        try:
            for split, name in ((train, "on the first training batch"), (val, "on the first validation batch")):
                part = {k: v[:batch] for k, v in split.items()}
                n = len(next(iter(part.values())))
                if n:
                    scalars = self.scalars(0)
                    drawn = self.draws(0, scalars, n, fixed=True)
                    loss = self._measure(self.env(part, self.forward(model, part, scalars, drawn), scalars, 0,
                                                  drawn))["loss"]
                    if initial and not math.isfinite(loss):
                        raise self.not_finite(loss, name)
            last = self.clock.steps - 1
            if last > 0:  # `specc check` evaluated them at its own count of steps, which epochs: leaves open
                draw_inputs(self.recipe, last, self.clock.steps, self.scalars(last), 1)
        finally:
            model.train(was)

    def _measure(self, env: dict[str, Any]) -> dict[str, float]:
        result = {"loss": float(self.loss(env))}
        for name, e in self.recipe.metrics.items():
            v = evaluate(e, env, TENSOR_FUNCTIONS, self.recipe.sources)
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise SpecError(Diagnostic(e.span, f"metric '{name}': expected a single number, got "
                                                       f"{list(v.shape)}"), self.recipe.sources)
                v = v.item()
            elif not isinstance(v, (int, float)):
                raise SpecError(Diagnostic(e.span, f"metric '{name}': expected a single number, got "
                                                   f"{type(v).__name__}"), self.recipe.sources)
            result[name] = float(v)
        return result


# -- checkpoints -------------------------------------------------------------------------------

def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never complete)."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()
            and (d / "model.safetensors").is_file() and (d / "state.pt").is_file()]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def save_checkpoint(run: Path, step: int, model, names: list[str], opt, keep: int) -> Path:
    root = Path(run) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-", dir=root))
    try:
        weights = model.state_dict()
        from .lora import SCALES_KEY, scales

        lora = scales(model, names)  # a LoRA run's file says its scales: `--weights` merges the updates
        save_file({k: weights[k].detach().cpu().contiguous() for k in names}, str(tmp / "model.safetensors"),
                  metadata={SCALES_KEY: json.dumps(lora)} if lora else None)
        state = {"step": step, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run: Path, model, names: list[str], opt, sources: dict[str, str]) -> int:
    """Restore the newest checkpoint of `run` into model and optimizer; returns its step."""
    dirs = checkpoint_dirs(run)
    if not dirs:
        raise SpecError(Diagnostic(Span(str(run), 0, 0), "--resume: the run has no complete checkpoint"), sources)
    d = dirs[-1]
    try:
        tensors = load_file(str(d / "model.safetensors"))
        state = torch.load(d / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise SpecError(Diagnostic(Span(str(d), 0, 0), f"--resume: cannot read the checkpoint: {e}"), sources) from None
    if set(tensors) != set(names) or any(tensors[k].shape != model.state_dict()[k].shape for k in names):
        raise SpecError(Diagnostic(Span(str(d), 0, 0), "--resume: the checkpoint's weights do not fit this spec's "
                                                       "model (another spec or other params?)"), sources)
    model.load_state_dict(tensors, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise SpecError(Diagnostic(Span(str(d), 0, 0), f"--resume: the optimizer state does not fit this recipe: "
                                                       f"{e}"), sources) from None
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# -- the run ------------------------------------------------------------------------------------

def total_steps(recipe: Recipe, n_train: int) -> int:
    t = recipe.section
    if t.batch > n_train:
        raise SpecError(Diagnostic(recipe.span, f"train: the batch ({t.batch}) is larger than the training split "
                                                f"({n_train} samples)"), recipe.sources)
    return t.steps if t.steps is not None else t.epochs * (n_train // t.batch)


def run(src: SpecSource, graph: Graph, recipe: Recipe, out: Path, resume: Path | None = None,
        until: int | None = None, progress: bool = False, dist: Dist = Dist(), opt_level: int = 1,
        weights: dict[str, torch.Tensor] | None = None, force: bool = False,
        protect: tuple[str | Path, ...] = ()) -> Result:
    """Train; write metrics, checkpoints and the built model into `out`. Raises SpecError on user errors.

    `out` must be new, empty, the folder resumed, or (with `force`) an earlier run (`rundir.py`);
    `protect`: more inputs (besides the spec and its data file) that writing the run must not delete.

    weights: starting values of the spec's parameters (all of them, as `specc.api.given_weights` gives
    them: e.g. a trained model to fine-tune); default: the spec's seeded initialisation."""
    t = recipe.section
    out = Path(out)
    # in every process, before they meet (DDP)
    check_run(out, resume=resume, force=force, protect=(*run_inputs(src, recipe), *protect))
    train, val = load_data(recipe)
    if t.eval is not None and not len(next(iter(val.values()))):
        raise SpecError(Diagnostic(recipe.span, "train: eval needs a validation split (split > 0)"), recipe.sources)
    if t.batch % dist.world:
        raise SpecError(Diagnostic(recipe.span, f"train: the batch ({t.batch}) must divide among {dist.world} "
                                                f"processes"), recipe.sources)
    n_train = len(next(iter(train.values())))
    steps = total_steps(recipe, n_train)
    torch.manual_seed(t.seed)
    from .peft import of_recipe

    base, graph = graph, of_recipe(graph, recipe)  # adapters and prefixes: new layers in the graph
    model = build_model(src, graph, recipe, base).to(dist.device)
    train = {k: v.to(dist.device) for k, v in train.items()}
    val = {k: v.to(dist.device) for k, v in val.items()}
    if weights is not None:
        with torch.no_grad():
            model.load_state_dict({k: v.to(dist.device) for k, v in weights.items()}, strict=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    names = weight_names(graph, recipe)
    opt = make_optimizer(model, recipe)
    stepper = Stepper(model, graph, recipe, steps)
    start = 0
    if resume is not None:
        start = load_checkpoint(Path(resume), model, names, opt, recipe.sources)
        if start > steps:
            raise SpecError(Diagnostic(Span(str(resume), 0, 0), f"--resume: the run's newest checkpoint is at step "
                                                                f"{start}, past the recipe's {steps} steps",
                                       notes=("raise train.steps (--set train.steps=N) to train on",)),
                            recipe.sources)
    trained = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=None if dist.device == "cpu" else [dist.device])
    batches = Batches(n_train, t.batch, t.seed, dist)
    # a bad loss or metric, or a loss that is not finite at the starting weights, fails before anything is written
    stepper.dry_run(model, train, val, t.batch // dist.world, initial=start == 0)
    clips = clip_sets(model, recipe)
    share = t.batch // dist.world
    rows = slice(dist.rank * share, (dist.rank + 1) * share)  # this process's share of the global batch
    stop = steps if until is None else min(steps, until)
    began = time.perf_counter()
    last_eval: dict[str, float] = {}
    loss_value = float("nan")
    noted = False  # the note that validation metrics are averaged over chunks, printed once
    pending: list[dict[str, Any]] = []  # lines of metrics.jsonl before the folder is made
    if dist.main and t.eval is not None and start == 0:  # the metrics at initialisation
        last_eval = stepper.evaluate(model, val, 0, stepper.scalars(0), EVAL_CHUNK)
        if not math.isfinite(last_eval["loss"]):
            raise stepper.not_finite(last_eval["loss"], "on the validation split")
        pending.append({"step": 0, "split": "val", **last_eval})
    bar = _Progress(stop, start, progress and dist.main)
    log = None
    try:
        if start >= stop and dist.main:  # nothing to train (--until at the resumed step): the folder all the same
            log = _open_run(out, resume, start, pending)
            loss_value = _logged_loss(Path(resume), start)
        for step in range(start, stop):
            scalars = stepper.scalars(step)
            factor = stepper.lr_factor(step)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            idx = batches.indices(step).to(dist.device)
            batch = {k: v[idx] for k, v in train.items()}
            drawn = stepper.draws(step, scalars, t.batch, rows)
            outputs = stepper.forward(trained, batch, scalars, drawn)
            with _global_masks(dist):
                loss = stepper.loss(stepper.env(batch, outputs, scalars, step, drawn))
            loss_value = _global_mean(loss.detach(), dist)  # checked before the update it would make
            if not math.isfinite(loss_value):
                if step == 0:  # no update has been made: the learning rate is not to blame
                    raise stepper.not_finite(loss_value, "on the first training batch")
                raise SpecError(Diagnostic(recipe.loss.span, f"loss: became {loss_value} at step {step + 1} "
                                                             f"(lower the learning rate, or clip gradients)"),
                                recipe.sources)
            if log is None and dist.main:
                log = _open_run(out, resume, start, pending)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group, max_norm in clips:
                torch.nn.utils.clip_grad_norm_(group, max_norm)
            opt.step()
            done = step + 1
            if log is not None:
                log.write(_json_line({"step": done, "loss": loss_value, "lr": opt.param_groups[0]["lr"],
                                      **scalars}))
            bar.update(done, loss_value)
            if dist.main and t.eval is not None and (done % t.eval.every == 0 or done == steps):
                last_eval = stepper.evaluate(model, val, step, scalars, EVAL_CHUNK)
                if stepper.chunked and not noted:
                    bar.message(f"note: {chunked_note()}")
                    noted = True
                log.write(_json_line({"step": done, "split": "val", **last_eval}))
                log.flush()
                bar.note(done, last_eval)
            if dist.main and ((t.checkpoint is not None and done % t.checkpoint.every == 0) or done == stop):
                log.flush()
                save_checkpoint(out, done, model, names, opt, t.checkpoint.keep if t.checkpoint else 1)
    finally:
        bar.close()
        if log is not None:
            log.close()
    seconds = time.perf_counter() - began
    result = Result(stop, loss_value, last_eval, seconds, out, stopped=stop < steps)
    if dist.main and not result.stopped:
        _export(src, graph, model, recipe, out, opt_level)
        summary = {"steps": stop, "seconds": round(seconds, 3), "final_loss": loss_value, "val": last_eval}
        if stepper.chunked:
            summary["val_note"] = chunked_note()
        (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")
    return result


@contextlib.contextmanager
def _global_masks(dist: Dist):
    """In a distributed step, masked means in the loss are over the global batch (expr.GLOBAL_SUM)."""
    if dist.world <= 1:
        yield
        return
    import torch.distributed as tdist

    def total(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        tdist.all_reduce(x)
        return x

    token = GLOBAL_SUM.set((total, dist.world))
    try:
        yield
    finally:
        GLOBAL_SUM.reset(token)


def _global_mean(loss: torch.Tensor, dist: Dist) -> float:
    if dist.world > 1:
        import torch.distributed as tdist

        loss = loss.clone()
        tdist.all_reduce(loss)
        loss /= dist.world
    return float(loss)


def _finite(value: Any) -> Any:
    """`value` with every float that is not finite (NaN, inf) as None: JSON has no NaN, and Python's
    json writes a bare NaN that other readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_line(record: dict[str, Any]) -> str:
    """One line of metrics.jsonl: valid JSON, a value that is not finite written as null."""
    return json.dumps(_finite(record), allow_nan=False) + "\n"


def _open_run(out: Path, resume: Path | None, start: int, pending: list[dict[str, Any]]):
    """Make the run folder (metrics.jsonl kept up to the resumed step; an earlier run that --force
    replaces: its checkpoints, model and summary gone) and open metrics.jsonl to append to, with the
    `pending` lines written."""
    out.mkdir(parents=True, exist_ok=True)
    _keep_metrics(out, resume, start)
    if not same_folder(resume, out):  # a new run: what is there is an earlier run's (check_run)
        for name in (CHECKPOINTS, MODEL):
            if (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)
        (out / "summary.json").unlink(missing_ok=True)
    log = open(out / "metrics.jsonl", "a")
    for record in pending:
        log.write(_json_line(record))
    return log


def _logged_loss(run: Path, step: int) -> float:
    """The training loss metrics.jsonl of `run` holds for `step` (nan when it holds none)."""
    try:
        for line in reversed((run / "metrics.jsonl").read_text().splitlines()):
            record = json.loads(line) if line.strip() else {}
            if record.get("step") == step and "split" not in record and isinstance(record.get("loss"), float):
                return record["loss"]
    except (OSError, ValueError):
        pass
    return float("nan")


def _keep_metrics(out: Path, resume: Path | None, start: int) -> None:
    """metrics.jsonl holds the lines up to the resumed step (none for a fresh run)."""
    path = out / "metrics.jsonl"
    lines: list[str] = []
    source = Path(resume) / "metrics.jsonl" if resume is not None else None
    if source is not None and source.is_file():
        lines = [ln for ln in source.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def _export(src: SpecSource, graph: Graph, model, recipe: Recipe, out: Path, opt_level: int) -> None:
    """RUN/model/: `specc build` of the trained weights (LoRA updates merged into their layers; `graph`
    with its adapters and prefixes, which stay layers of their own)."""
    from specc.api import given_weights
    from specc.backends.pytorch.build import artifacts, write_atomic

    state = model.state_dict()
    trained = {k: state[k].detach().cpu() for k in weight_names(graph)}
    if recipe.lora_layers:
        from .lora import merged

        trained = merged(model, list(recipe.lora_layers), trained)
    weights = given_weights(graph, trained)
    write_atomic(out / "model", artifacts(graph, src.text, src.file, src.spec.paper, src.spec.description,
                                          weights=weights, ctx=PassContext(opt_level=opt_level)))


class _Progress:
    """A rich progress bar (step, loss, rate, time left) on a terminal; nothing otherwise."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.quiet = not enabled
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                                     TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                     console=Console(stderr=True))
            self.task = self.progress.add_task("train", total=total, completed=done, loss="-", rate="")
            self.progress.start()
        self.began, self.first = time.perf_counter(), done

    def update(self, done: int, loss: float) -> None:
        if self.enabled:
            rate = (done - self.first) / max(1e-9, time.perf_counter() - self.began)
            self.progress.update(self.task, completed=done, loss=f"{loss:.4g}", rate=f"{rate:.1f} it/s")

    def note(self, done: int, metrics: dict[str, float]) -> None:
        self.message(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def message(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)
        elif not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
