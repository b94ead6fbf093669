"""The `specc` command line.

    specc check SPEC [--set k=v]...       shapes, parameters and FLOPs, or located errors (exit 2)
    specc ir SPEC [--set k=v]...          the typed IR as text
    specc build SPEC -o OUT [--set k=v]   model.py + weights.safetensors + manifest.json
    specc ops                             the operators and their signatures
    specc schema [-o FILE]                the JSON Schema of spec files (for editors)
    specc graph SPEC -o FILE.svg          a picture of the IR (SVG, and FILE.dot for Graphviz)
    specc train SPEC -o RUN               run the spec's training recipe (its train: section)
    specc prune SPEC --flops F -o OUT     remove heads and MLP neurons to F of the FLOPs; the pruned build

User errors print `FILE:LINE:COL: error: ...` with the line and a caret, and exit 2; a user error
never prints a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from specc.compiler.notices import SpeccWarning
from specc.dsl.diagnostics import Collector, Diagnostic, Span, SpecError, did_you_mean

OVERRIDES_FILE = "<--set>"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: exit 2 with the usage line, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"specc: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="specc", description="A declarative model-spec compiler: spec -> typed IR -> PyTorch.")
    p.add_argument("--version", action="version", version="specc 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def spec_cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("spec", help="the spec file (YAML)")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                       help="override a parameter (repeatable)")
        c.add_argument("--no-color", action="store_true", help="plain output")
        c.add_argument("--allow-import", dest="allow_imports", action="append", default=[], metavar="MODULE",
                       type=_module_name, help="let the spec import this Python module (its `imports:`), which "
                                               "declares custom operators; repeatable")
        return c

    def pass_options(c: argparse.ArgumentParser, default: int) -> None:
        c.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=default,
                       help=f"optimisation level (default {default}); `specc passes` lists what each runs")
        c.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="skip a pass (repeatable)")
        c.add_argument("--print-after", action="append", default=[], metavar="NAME|all",
                       help="print the IR after a pass, or after every pass (repeatable)")
        c.add_argument("--debug", action="store_true", help="verify the IR after every pass")
        c.add_argument("--deploy", action="store_true",
                       help="the deploy graph: drop training-only outputs and all that only they need")

    c = spec_cmd("check", "Parse and check a spec; print outputs, parameters and FLOPs.")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.add_argument("--params", action="store_true",
                   help="list every parameter: its name (as --weights, freeze: and groups: take it), shape, dtype, "
                        "the spec line of its layer and the stored parameter a tied one is tied to (which a "
                        "recipe's freeze: and groups: select by either name)")
    i = spec_cmd("ir", "Print the typed IR, one node per line (optimised with -O1/-O2).")
    pass_options(i, 0)
    b = spec_cmd("build", "Build a standalone PyTorch module with initialised weights.")
    b.add_argument("-o", "--out", required=True,
                   help="output directory, replaced atomically: it must be new, empty or an earlier specc build "
                        "(see --force); a link to a folder: its target is replaced")
    b.add_argument("--force", action="store_true",
                   help="replace OUT even when it holds files specc did not write (they are deleted); never the "
                        "current directory, a parent of it, or a folder holding the spec or another input")
    b.add_argument("--run", action="store_true", help="after building, run the model on example_inputs()")
    b.add_argument("--torch-compile", action="store_true",
                   help="make the built load() wrap the model in torch.compile by default")
    b.add_argument("--target", choices=("torch", "tvm-llvm", "tvm-cuda"), default="torch",
                   help="torch: readable PyTorch source (default); tvm-llvm / tvm-cuda: a TVM-compiled library "
                        "for this CPU / for NVIDIA sm_90 GPUs, with a model.py of the same interface")
    b.add_argument("--tuning-db", metavar="DIR", help="TVM targets: use (and extend) this MetaSchedule database")
    b.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="tvm-llvm: first tune the kernels the database has no record of (needs --tuning-db)")
    b.add_argument("--weights", metavar="FILE.safetensors",
                   help="given values for some parameters (names as `specc ir -O0` shows them); the rest keep "
                        "their seeded initialisation")
    pass_options(b, 1)
    v = spec_cmd("verify", "Search for inputs on which the optimised or compiled model differs from the "
                           "unoptimised one (exit 1 on a mismatch).")
    v.add_argument("--examples", type=_positive_int, default=50, help="how many generated examples (default 50)")
    v.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=2, help="candidate opt level")
    v.add_argument("--target", choices=("torch", "tvm-llvm"), default="torch", help="candidate backend")
    v.add_argument("--weights", metavar="FILE.safetensors",
                   help="run both models with these values of the spec's parameters (e.g. a trained model; names "
                        "as `specc ir -O0` shows them), the rest seeded; default: seeded weights plus noise")
    gr = spec_cmd("graph", "Draw the IR: FILE.svg (laid out without Graphviz) and FILE.dot.")
    gr.add_argument("-o", "--out", required=True, metavar="FILE.svg",
                    help="the SVG to write (the DOT goes beside it), or FILE.dot for the DOT alone")
    pass_options(gr, 0)
    tr = spec_cmd("train", "Run the spec's training recipe (its train: section); --set train.KEY=VALUE overrides "
                           "the recipe.")
    tr.add_argument("-o", "--out", required=True, metavar="RUN",
                    help="the run folder: metrics.jsonl, checkpoints/, model/ (a specc build of the trained weights)")
    tr.add_argument("--resume", metavar="RUN", help="continue from the newest checkpoint of this run folder")
    tr.add_argument("--force", action="store_true",
                    help="replace an earlier run in the -o folder (without it, an earlier run there is an error "
                         "unless it is the --resume folder)")
    tr.add_argument("--until", type=_count, metavar="STEP", help="stop after this step (resume the run later)")
    tr.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="train with N processes on this machine (torch.distributed: gloo on CPU, nccl on GPUs)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--threads", type=_positive_int, metavar="N",
                    help="CPU threads per process (torch.set_num_threads)")
    tr.add_argument("--device", default="cpu", metavar="DEVICE",
                    help="where one process trains: cpu (default) or cuda[:N]; with --nproc each process takes "
                         "its own GPU when there are GPUs")
    tr.add_argument("--weights", metavar="FILE.safetensors",
                    help="start from these values of the spec's parameters (e.g. RUN/model/weights.safetensors of "
                         "an -O0 build, to fine-tune); names as `specc ir -O0` shows them")
    tr.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=1,
                    help="optimisation level of the built RUN/model/ (default 1)")
    pr = spec_cmd("prune", "Remove attention heads and MLP neurons (OPTIN: least important per FLOP first, "
                           "no retraining) until the FLOPs are within a budget; write the pruned build.")
    pr.add_argument("--flops", required=True, metavar="FRACTION",
                    help="the budget: the pruned model's FLOPs at most FRACTION of the spec's (0 < FRACTION <= 1)")
    pr.add_argument("-o", "--out", required=True,
                    help="output directory, replaced atomically as for build: new, empty or an earlier specc build")
    pr.add_argument("--force", action="store_true",
                    help="replace OUT even when it holds files specc did not write (they are deleted), as for build")
    pr.add_argument("--calib", metavar="data|example|FILE",
                    help="calibration batch: samples of the spec's train: data set (data, the default when it has "
                         "one), its example inputs (example), or a .npz/.safetensors file with one tensor per input")
    pr.add_argument("--at", action="append", default=[], metavar="DIM=SIZE",
                    help="count the FLOPs with this symbolic dimension at SIZE instead of the spec's example size "
                         "(repeatable; attention's FLOPs grow with T squared, so the budget depends on it)")
    pr.add_argument("--samples", type=int, default=64, metavar="N",
                    help="calibration samples taken from the data set or file (default 64, at most 4096; a "
                         "smaller split or file is used whole)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the calibration samples (default 0)")
    pr.add_argument("--weights", metavar="FILE.safetensors",
                    help="the spec's parameters to prune (e.g. a trained model); names as `specc ir -O0` shows them")
    pr.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=1,
                    help="optimisation level of the pruned build (default 1)")
    sc = sub.add_parser("schema", help="Print (or write) the JSON Schema of spec files, for editors.")
    sc.add_argument("-o", "--out", metavar="FILE", help="write the schema to FILE instead of printing it")
    op = sub.add_parser("ops", help="List the operators with their signatures (the whole text of the named ones).")
    op.add_argument("names", nargs="*", metavar="OP", help="print these operators' whole documentation")
    sub.add_parser("passes", help="List the optimisation passes in pipeline order with their opt levels.")
    return p


def _module_name(text: str) -> str:
    from specc.dsl.schema import check_module_name

    try:
        return check_module_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str, least: int = 1) -> int:
    what = "a positive integer" if least == 1 else "an integer >= 0"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
    return n


def _count(text: str) -> int:
    return _positive_int(text, least=0)


def parse_overrides(items: Sequence[str]) -> tuple[dict[str, str], dict[str, tuple[str, Span]], str, Collector]:
    """`--set k=v` strings -> values, their spans in a pseudo-file (one override per line), and errors."""
    values: dict[str, str] = {}
    spans: dict[str, tuple[str, Span]] = {}
    errors = Collector()
    text = "\n".join(items)
    for i, item in enumerate(items, start=1):
        if "=" not in item:
            errors.error(Span(OVERRIDES_FILE, i, 1, i, len(item) + 1),
                         f"bad override '{item}': expected NAME=VALUE, e.g. --set d_model=256")
            continue
        key, value = item.split("=", 1)
        key = key.strip()
        if key in values:
            errors.error(Span(OVERRIDES_FILE, i, 1, i, len(key) + 1), f"parameter '{key}' is set twice")
            continue
        values[key] = value
        spans[key] = (value, Span(OVERRIDES_FILE, i, len(key) + 2 if value else 1, i, len(item) + 1))
    return values, spans, text, errors


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader stopped early (specc ops | head): no traceback, and none at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    color = sys.stderr.isatty() and not getattr(args, "no_color", False) and "NO_COLOR" not in os.environ
    if args.command == "ops":
        return _ops(args.names)
    if args.command == "passes":
        return _passes()
    if args.command == "schema":
        return _schema(args)
    values, spans, set_text, errors = parse_overrides(args.overrides)
    import warnings

    shown = warnings.showwarning

    def show(message, category, *rest, **kw):  # specc's own warnings as one plain line, others as Python shows them
        if issubclass(category, SpeccWarning):
            print(f"specc: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *rest, **kw)

    warnings.showwarning = show
    try:
        code = _run(args, values, spans, errors)
        errors.raise_if_any({OVERRIDES_FILE: set_text})
        return code
    except SpecError as e:
        e.diagnostics = errors.diagnostics + [d for d in e.diagnostics if d not in errors.diagnostics]
        e.sources.setdefault(OVERRIDES_FILE, set_text)
        print(e.render(color=color), file=sys.stderr)
        n = len(e.diagnostics)
        print(f"{n} error{'s' if n != 1 else ''}", file=sys.stderr)
        if getattr(args, "json", False):  # `check --json`: the errors as JSON on stdout too, for tools
            print(json.dumps({"errors": [_diagnostic_json(d) for d in e.diagnostics]}, indent=2))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a compiler bug, not a user error
        if os.environ.get("SPECC_DEBUG"):
            raise
        print(f"specc: internal error: {type(e).__name__}: {e}\n"
              f"(this is a bug in specc; rerun with SPECC_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3


def _diagnostic_json(d) -> dict:
    """One error of `check --json`: where (1-based line and column, the end exclusive), what, the notes."""
    s = d.span
    return {"file": s.file, "line": s.line, "col": s.col, "end_line": s.end_line, "end_col": s.end_col,
            "severity": d.severity, "message": d.message, "notes": list(d.notes)}


def _run(args: argparse.Namespace, values: dict[str, str], spans: dict[str, tuple[str, Span]],
         earlier: Collector) -> int:
    from specc.api import _front

    recipe_keys = {k: spans[k] for k in values  # --set train.KEY=VALUE (check and train read the recipe)
                   if k.startswith("train.") and args.command in ("check", "train")}
    values = {k: v for k, v in values.items() if k not in recipe_keys}
    spans = {k: v for k, v in spans.items() if k not in recipe_keys}
    recipe_keys = {k[len("train."):]: v for k, v in recipe_keys.items()}
    src, graph = _front(Path(args.spec), values, spans, allow_imports=args.allow_imports)
    if earlier:  # bad --set syntax: report it (with any spec errors) before doing anything
        return 2
    recipe = None
    if args.command in ("check", "train") and (src.spec.train is not None or recipe_keys):
        from specc.train.recipe import check_recipe

        recipe = check_recipe(src, graph, recipe_keys)
    if args.command == "train":
        return _train(args, src, graph, recipe)
    if args.command == "check":
        from specc.api import summary_of

        summary = summary_of(graph)
        if args.json:
            data = summary.to_json()
            if recipe is not None:
                data["train"] = _recipe_json(recipe)
            if args.params:
                data["parameters"] = _parameter_rows(graph)
            print(json.dumps(data, indent=2))
        elif args.params:
            rows = _parameter_rows(graph)
            width = max((len(r["name"]) for r in rows), default=0)
            for r in rows:
                shape = f"{r['dtype']}[{', '.join(map(str, r['shape']))}]"
                what = f"tied to {r['tied_to']}" if r["tied_to"] else ("" if r["kind"] == "trainable" else r["kind"])
                print(f"{r['name']:{width}s}  {shape:24s} {r['op']:12s} {r['where']}" + (f"  ({what})" if what else ""))
        else:
            _print_summary(summary, color=not args.no_color)
            if recipe is not None:
                print(f"train       {_describe_recipe(recipe)}")
        return 0
    if args.command == "ir":
        from specc.compiler.passes import optimize
        from specc.compiler.printer import print_graph

        graph, _ = optimize(graph, _pass_context(args, src.file))
        sys.stdout.write(print_graph(graph))
        return 0
    if args.command == "verify":
        return _verify(args, src, graph)
    if args.command == "build":
        from specc.backends.outdir import check
        from specc.backends.pytorch.build import artifacts, write_atomic

        protect = (args.spec, args.weights)
        check(args.out, force=args.force, protect=(*protect, args.tuning_db))  # before anything is built
        ctx = _pass_context(args, src.file)
        if args.run:
            from specc.backends.pytorch.build import check_example_inputs

            check_example_inputs(graph)  # before anything is built or written
        weights = _read_weights(graph, args.weights) if args.weights else None
        files = artifacts(graph, src.text, src.file, src.spec.paper, src.spec.description,
                          weights=weights, ctx=ctx, torch_compile=args.torch_compile)
        if args.target != "torch":
            return _build_tvm(args, src, graph, ctx, json.loads(files["manifest.json"]), weights)
        write_atomic(Path(args.out), files, force=args.force, protect=protect)
        print(f"built {graph.name} -> {args.out}/ ({', '.join(files)})")
        if args.run:
            _run_built(Path(args.out))
        return 0
    if args.command == "graph":
        return _graph(args, src, graph)
    if args.command == "prune":
        return _prune(args, src, graph)
    raise AssertionError(args.command)  # pragma: no cover


def _parameter_rows(graph) -> list[dict]:
    """Every parameter of the unoptimised graph in node order: name, shape, dtype, op, where its layer is
    written (file:line:col), kind (trainable, frozen or buffer), and the owner of a tied one."""
    rows = []
    for _, node in graph.nodes():
        for p in node.params:
            rows.append({"name": ".".join(node.path + (p.name,)), "shape": list(p.shape), "dtype": p.dtype,
                         "op": node.op, "where": f"{node.span.file}:{node.span.line}:{node.span.col}",
                         "kind": "buffer" if p.buffer else "frozen" if p.frozen else "trainable",
                         "tied_to": p.tied_to})
    return rows


def _describe_recipe(recipe) -> str:
    t = recipe.section
    data = recipe.generator.name if recipe.generator else Path(recipe.data_file.file).name
    length = f"{t.steps} steps" if t.steps is not None else f"{t.epochs} epochs"
    peft = [f"{what} on {len(layers)} layer{'s' if len(layers) != 1 else ''}"
            for what, layers in (("LoRA", recipe.lora_layers), ("adapters", recipe.adapter_layers),
                                 ("prefixes", recipe.prefix_layers)) if layers]
    drawn = [f"{name} = {t.random[name]} each step" for name in recipe.random]
    return (f"{data} ({', '.join(recipe.fields)}), {recipe.optimizer}, {length} of batch {t.batch}"
            + (f"; {', '.join(drawn)}" if drawn else "") + (f"; {', '.join(peft)}" if peft else ""))


def _recipe_json(recipe) -> dict:
    t = recipe.section
    return {"data": recipe.generator.name if recipe.generator else recipe.data_file.file,
            "fields": {k: {"dtype": d, "shape": ["N", *shape], "range": list(r) if r else None}
                       for k, (d, shape, r) in recipe.fields.items()},
            "feed": recipe.feed, "random": {k: t.random[k] for k in recipe.random}, "optimizer": recipe.optimizer, "steps": t.steps, "epochs": t.epochs,
            "batch": t.batch, "metrics": sorted(recipe.metrics), "lora": list(recipe.lora_layers),
            "adapters": list(recipe.adapter_layers), "prefix": list(recipe.prefix_layers)}


def _train(args: argparse.Namespace, src, graph, recipe) -> int:
    """`specc train`: one process, several through torchrun (--nproc), or a torchrun worker."""
    from specc.train.loop import run

    if recipe is None:
        raise SpecError(Diagnostic(Span(src.file, 1, 1), f"{graph.name}: the spec has no train: section"),
                        {src.file: src.text})
    if args.nproc < 1:
        raise SystemExit("specc: error: --nproc must be at least 1")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from specc.train.dist import check_launch, launch
        from specc.train.rundir import check_run, run_inputs

        check_launch(recipe, args.nproc)  # user errors here, before the workers start
        check_run(args.out, resume=args.resume, force=args.force, protect=(*run_inputs(src, recipe), args.weights))

        return launch(args.nproc, ["train"] + _argv_of(args))
    from specc.train.dist import process_group

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with process_group() as dist:
        if dist.world == 1 and args.device != "cpu":
            dist = _device(args.device, dist)
        weights = _read_weights(graph, args.weights) if args.weights else None
        result = run(src, graph, recipe, Path(args.out), Path(args.resume) if args.resume else None, args.until,
                     progress=not args.quiet, dist=dist, opt_level=args.opt_level, weights=weights, force=args.force,
                     protect=(args.weights,) if args.weights else ())
    if dist.main:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        if result.stopped:
            print(f"stopped after step {result.steps} (resume with --resume {args.out}); loss {result.loss:.4g}")
        else:
            print(f"trained {graph.name}: {result.steps} steps in {result.seconds:.1f} s, loss {result.loss:.4g}"
                  + (f"; val {metrics}" if metrics else "") + f" -> {args.out}/ (model/, metrics.jsonl, checkpoints/)")
    return 0


def _device(name: str, dist):
    """The single process's Dist on the device `name` (a user error when it is not there)."""
    import dataclasses

    import torch

    try:
        device = torch.device(name)
        if device.type not in ("cpu", "cuda", "mps"):
            raise RuntimeError("expected cpu, cuda, cuda:N or mps")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise SpecError(Diagnostic(Span("<--device>", 0, 0), f"--device {name}: {str(e).splitlines()[0]}")) from None
    return dataclasses.replace(dist, device=str(device))


def _argv_of(args: argparse.Namespace) -> list[str]:
    out = [args.spec, "-o", args.out]
    for item in args.overrides:
        out += ["--set", item]
    for m in args.allow_imports:
        out += ["--allow-import", m]
    if args.resume:
        out += ["--resume", args.resume]
    if args.force:
        out.append("--force")
    if args.until is not None:
        out += ["--until", str(args.until)]
    if args.quiet:
        out.append("--quiet")
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.weights:
        out += ["--weights", args.weights]
    return out + ["-O", str(args.opt_level)]


def _read_weights(graph, path: str):
    """The -O0 graph's parameters with those of a .safetensors file in place (errors located at the file)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from specc.api import given_weights

    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        level = metadata.get("specc_opt_level", "0")
    except (OSError, SafetensorError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise SpecError(Diagnostic(Span(path, 0, 0), f"cannot read weights: {reason}")) from None
    if any(k.endswith((".lora_A", ".lora_B")) for k in tensors):  # a LoRA run's checkpoint: merge its updates
        tensors = _merge_lora(tensors, metadata, path)
    if level != "0":  # its values are the optimised graph's (fused, folded), even where a name fits
        raise SpecError(Diagnostic(Span(path, 0, 0), f"weights: {path} holds the weights of an -O{level} build, the "
                                                     f"optimised graph's parameters (fused, folded), not the spec's",
                                   notes=("--weights takes the spec's parameters (names as `specc ir -O0` prints "
                                          "them): an -O0 build's weights.safetensors or a training checkpoint's "
                                          "model.safetensors",)))
    return given_weights(graph, tensors, source=path)


def _merge_lora(tensors: dict, metadata: dict, path: str) -> dict:
    """The spec's parameters of a LoRA run's checkpoint: each layer's W + alpha/r * B @ A (the scales are
    in the file's metadata, written with it)."""
    from specc.train.lora import SCALES_KEY, merge_factors

    def fail(message: str):
        raise SpecError(Diagnostic(Span(path, 0, 0), f"weights: {message}"))

    try:
        scales = json.loads(metadata[SCALES_KEY])
        if not isinstance(scales, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in scales.values()):
            raise ValueError
    except KeyError:
        fail(f"{path} holds LoRA factors (lora_A, lora_B) but not their scales (alpha / r), so the updates "
             f"cannot be merged; give a checkpoint that `specc train` wrote with its `lora:` recipe")
    except ValueError:
        fail(f"{path}: the LoRA scales in its metadata ({SCALES_KEY}) are not a mapping of layers to numbers")
    try:
        return merge_factors(tensors, {str(k): float(v) for k, v in scales.items()})
    except ValueError as e:
        fail(f"{path}: {e}")


def _prune(args: argparse.Namespace, src, graph) -> int:
    """`specc prune`: importance on a calibration batch, global ranking under the FLOP budget, the pruned build."""
    from specc.pruning import run, summary_lines

    where = Span("<--flops>", 0, 0)
    try:
        budget = float(args.flops)
    except ValueError:
        raise SpecError(Diagnostic(where, f"--flops takes a fraction of the model's FLOPs in (0, 1], e.g. 0.6, "
                                          f"got '{args.flops}'")) from None
    at_span = Span("<--at>", 0, 0)
    at = {}
    for item in args.at:
        name, eq, size = item.partition("=")
        if not eq or not name.strip() or not size.strip().isdigit():
            raise SpecError(Diagnostic(at_span, f"--at takes DIM=SIZE with a positive integer size, e.g. T=128, "
                                                f"got '{item}'"))
        if name.strip() in at:
            raise SpecError(Diagnostic(at_span, f"--at {name.strip()} is given twice ({at[name.strip()]} and {size})"))
        at[name.strip()] = int(size)
    weights = _read_weights(graph, args.weights) if args.weights else None
    report = run(src, graph, budget, base=weights, calib=args.calib, samples=args.samples, seed=args.seed,
                 opt_level=args.opt_level, out=args.out, at=at, budget_span=where,
                 calib_span=Span("<--calib>", 0, 0), at_span=at_span, force=args.force,
                 protect=(args.spec, args.weights))
    print(f"pruned {graph.name} -> {args.out}/ (model.py, weights.safetensors, manifest.json)")
    for line in summary_lines(report):
        print(line)
    return 0


def _graph(args: argparse.Namespace, src, graph) -> int:
    from specc.compiler.passes import optimize
    from specc.graph import render

    out = Path(args.out)
    kind = out.suffix.lower()
    if kind not in (".svg", ".dot"):
        raise SpecError(Diagnostic(Span("<-o>", 0, 0), f"-o {args.out}: specc graph writes SVG (FILE.svg, and "
                                   f"FILE.dot beside it) or DOT (FILE.dot), not {kind or 'a file without a suffix'}",
                                   "for other formats render the DOT with Graphviz, e.g. dot -Tpng FILE.dot -o "
                                   "FILE.png"))
    graph, _ = optimize(graph, _pass_context(args, src.file))
    dot, svg = render(graph)
    written = {out.with_suffix(".dot"): dot} | ({out: svg} if kind == ".svg" else {})
    temps: list[Path] = []
    try:  # each file written beside itself and renamed into place: never half a picture
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, text in written.items():
            temps.append(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
            temps[-1].write_text(text)
        for temp, path in zip(temps, written):
            os.replace(temp, path)
    except OSError as e:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise SpecError(Diagnostic(Span(str(out), 0, 0), f"cannot write: {e.strerror or e}")) from None
    print(f"drew {graph.name} ({len(graph)} nodes) -> {' and '.join(map(str, reversed(written)))}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from specc.dsl.schema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as e:
            print(f"specc: error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wrote the spec JSON Schema to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _build_tvm(args: argparse.Namespace, src, graph, ctx, manifest: dict, given: dict | None) -> int:
    """Build for a TVM target; an op the target cannot lower is a located error naming the targets that can.
    `given`: every -O0 parameter with --weights in place (None: the seeded initialisation)."""
    try:
        from specc.backends.tvm.lowering import LoweringError
        from specc.backends.tvm.package import PackageError, build_package, check_options
    except ImportError as e:
        raise SpecError(Diagnostic(Span(src.file, 0, 0), f"--target {args.target} needs apache-tvm "
                                                         f"(pip install 'specc[tvm]'): {e}")) from None
    from specc.backends.pytorch.weights import init_weights, materialise
    from specc.compiler.passes import optimize

    try:
        protect = (args.spec, args.weights)
        check_options(args.target, args.out, args.tuning_db, args.tune, force=args.force,
                      protect=protect)  # before any compiling or writing
        optimised, _ = optimize(graph, ctx)
        _tvm_lowerable(optimised, args.target, src)
        weights = materialise(optimised, given if given is not None else init_weights(graph))
        build_package(optimised, weights, Path(args.out), args.target, manifest, tuning_db=args.tuning_db,
                      opt_level=ctx.opt_level, tune_trials=args.tune, force=args.force, protect=protect)
    except PackageError as e:
        raise SpecError(Diagnostic(Span(e.path or src.file, 0, 0), f"target {args.target}: {e}")) from None
    except LoweringError as e:
        raise _lowering_error(e, args.target, src) from None
    print(f"built {graph.name} -> {args.out}/ (model_lib.so, model.py, loader.py, weights.safetensors, manifest.json, "
          f"tvm_manifest.json; target {args.target})")
    if args.run:
        if args.target == "tvm-cuda":
            print("not run: the library holds CUDA kernels for sm_90 and this machine has no NVIDIA GPU")
        else:
            _run_built(Path(args.out))
    return 0


def _lowering_error(e, target: str, src) -> SpecError:
    """A LoweringError (something of the graph this TVM target cannot lower) as a located user error."""
    return SpecError(Diagnostic(e.span or Span(src.file, 0, 0), f"target {target}: {e}",
                                notes=("targets that support it: torch",)), {src.file: src.text})


def _tvm_lowerable(graph, target: str, src) -> None:
    """A located error at every op of `graph` that the TVM backend cannot lower, naming the targets that can."""
    from specc.backends.tvm.lowering import LOWERINGS, UNSUPPORTED

    errors = Collector()
    for _, node in graph.nodes():
        if node.op in UNSUPPORTED or node.op not in LOWERINGS:
            errors.error(node.span, f"operator '{node.op}' has no lowering for target {target}",
                         "targets that support it: torch")
    errors.raise_if_any({src.file: src.text})


def _pass_context(args: argparse.Namespace, file: str):
    """The PassContext the flags ask for; an unknown pass name is a user error."""
    from specc.compiler.passes import PASSES, PassContext, describe

    known = {name for name, _, _ in describe()}
    errors = Collector()
    for flag, names in (("--disable-pass", args.disable_pass), ("--print-after", args.print_after)):
        for name in names:
            if name not in known and not (flag == "--print-after" and name == "all"):
                errors.error(Span(file, 0, 0), f"{flag}: unknown pass '{name}'" + did_you_mean(name, known),
                             f"passes: {', '.join(sorted(known))}")
    errors.raise_if_any()
    assert set(PASSES) >= known
    return PassContext(opt_level=args.opt_level, disabled=frozenset(args.disable_pass),
                       print_after=frozenset(args.print_after), verify_each=args.debug, deploy=args.deploy,
                       emit=lambda text: sys.stderr.write(text))


def _verify(args: argparse.Namespace, src, graph) -> int:
    from specc.verify import ATOL, verify_graph

    if args.target != "torch":  # an op the target cannot lower: located errors, before any compiling
        from specc.compiler.passes import PassContext, optimize

        try:
            import specc.backends.tvm.lowering  # noqa: F401
        except ImportError as e:
            raise SpecError(Diagnostic(Span(src.file, 0, 0), f"--target {args.target} needs apache-tvm "
                                                             f"(pip install 'specc[tvm]'): {e}")) from None
        _tvm_lowerable(optimize(graph, PassContext(opt_level=args.opt_level))[0], args.target, src)
    weights = _read_weights(graph, args.weights) if args.weights else None
    what = f"-O{args.opt_level} ({args.target})"
    print(f"verify {graph.name}: {what} against -O0 in float64, {args.examples} examples"
          + (f", weights {args.weights}" if args.weights else ""))
    lowering_error: tuple = ()
    if args.target != "torch":
        from specc.backends.tvm.lowering import LoweringError  # (imported above: the tvm extra is there)

        lowering_error = (LoweringError,)
    try:
        report = verify_graph(graph, src.text, src.file, args.examples, args.opt_level, args.target, weights=weights)
    except lowering_error as e:
        raise _lowering_error(e, args.target, src) from None
    for note in report.notes:
        print(f"  note: {note}")
    if report.ok:
        tol = report.tolerance.get(report.worst_output, ATOL)
        print(f"  worst error {report.worst:.3g}" + (f" (output {report.worst_output})" if report.worst_output else "")
              + f"; tolerance {tol:g}*max(1, max|reference|) + {tol:g}*|reference|, per output")
        print(f"ok: {report.examples} runs, no mismatch")
        return 0
    m = report.mismatch
    dims = ", ".join(f"{k}={v}" for k, v in m.bindings.items()) or "no symbolic dimensions"
    print(f"MISMATCH: output '{m.output}' differs by {m.error:.3g} (allowed {m.bound:.3g})")
    fill = "" if m.bool_fill is None else f", bool inputs all {str(m.bool_fill).lower()}"
    print(f"  minimal counterexample: {dims}; inputs example_inputs(seed={m.input_seed}) * {m.input_scale:g}{fill}")
    return 1


def _passes() -> int:
    from specc.compiler.passes import describe

    for name, level, doc in describe():
        print(f"-O{level}  {name:22s} {doc}")
    return 0


def _run_built(out: Path) -> None:
    from specc.backends.pytorch.build import import_model_module

    module = import_model_module(out)
    model = module.load(out)
    inputs = module.example_inputs()
    import torch

    try:
        with torch.no_grad():
            result = model(*inputs)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "ZeroDivisionError" in str(e):
            raise SpecError(Diagnostic(Span(str(out / "model.py"), 0, 0),
                                       "the build is complete, but on its example inputs the model divided an "
                                       "integer by 0 (torch raises ZeroDivisionError)",
                                       notes=("example_inputs() draws integers without a range from 0 to 7: give the "
                                              "divisor's input a range without 0, e.g. i64[B] in range(1, 8)",))) from None
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        raise SpecError(Diagnostic(Span(str(out / "model.py"), 0, 0),
                                   f"the build is complete, but running it on its example inputs ran out of "
                                   f"memory: {str(e).splitlines()[0]}")) from None
    results = result if isinstance(result, tuple) else (result,)
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in results)
    print(f"ran {out}/model.py on example_inputs(): {shapes}")


def _print_summary(summary, color: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from specc.compiler.dims import fmt
    from specc.compiler.summary import human

    console = Console(no_color=not color, highlight=False, soft_wrap=True)
    table = Table(title=f"{summary.name}: ok", title_justify="left")
    table.add_column("output")
    table.add_column("type")
    table.add_column("example shape")
    for o in summary.outputs:
        name = o.name + (" (training only)" if o.name in summary.training_only else "")
        table.add_row(name, str(o.type), str(list(o.example_shape)))
    console.print(table)
    dims = ", ".join(f"{k}={v}" for k, v in summary.bindings.items())
    console.print(f"parameters  {summary.params:,} ({human(summary.param_bytes)}B)"
                  + (f", trainable {summary.trainable_params:,}" if summary.trainable_params != summary.params else "")
                  + (f"; buffers {summary.buffers:,}" if summary.buffers else ""))
    console.print(f"FLOPs       {human(summary.example_flops)} at {dims or 'the declared shapes'}"
                  f"  [{fmt(summary.flops)}]")
    console.print(f"nodes       {summary.nodes}")
    if summary.bound:  # the spec's params as bound: defaults, --set, the scale preset, derived values
        shown = {k: str(v).lower() if isinstance(v, bool) or v is None else v for k, v in summary.bound.items()}
        console.print("params      " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if summary.deploy is not None:
        d = summary.deploy
        console.print(f"deploy      without {', '.join(summary.training_only)} (training only): "
                      f"parameters {d.params:,}, FLOPs {human(d.example_flops)}, nodes {d.nodes}")


def _ops(names: Sequence[str] = ()) -> int:
    """Every operator, a line each (its signature and the first paragraph of its text); with names, the
    whole text of each (an unknown name: exit 2, with close names)."""
    import inspect

    from specc.compiler import ops as _  # noqa: F401
    from specc.compiler.registry import REGISTRY

    public = {name: opdef for name, opdef in REGISTRY.items() if opdef.category != "internal"}
    if names:
        unknown = [n for n in names if n not in public]
        for n in unknown:
            print(f"specc: error: unknown operator '{n}'{did_you_mean(n, public)}", file=sys.stderr)
        if unknown:
            return 2
        for i, n in enumerate(names):
            print(("\n" if i else "") + (inspect.cleandoc(public[n].doc) if public[n].doc else public[n].signature()))
        return 0
    for name, opdef in sorted(public.items()):
        first = " ".join(inspect.cleandoc(opdef.doc).split("\n\n")[0].split()) if opdef.doc else ""
        print(f"{opdef.signature():70s} {first}")
    print("\n(`specc ops NAME` prints an operator's whole text)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
