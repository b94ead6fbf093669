"""Run the shipped training recipes in full and record what they reach in BENCHMARKS.md.

    python -m specc.train.bench                 # every recipe (a few minutes each at most, one thread)
    python -m specc.train.bench --only dann     # some of them
    python -m specc.train.bench --print         # print the section instead of writing it

Each recipe runs through the CLI (`specc train SPEC -o RUN --threads 1 --quiet`), as a user would run
it; the table lists the command, the steps, the wall time and the metrics of the last evaluation.
The section sits between markers in BENCHMARKS.md and is replaced in place; the rest of the file is
left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- training recipes: begin (python -m specc.train.bench) -->", "<!-- training recipes: end -->"

#: name -> (spec, extra CLI arguments, what the numbers show)
RECIPES = {
    "gpt_reversed": ("specs/gpt.yaml", [], "reversed-format 3-digit addition; exact = whole answers right"),
    "gpt_plain": ("specs/gpt.yaml", ["--set", 'train.data=arithmetic(digits=3, format="plain", n=30000)'],
                  "the same recipe and step budget, plain format"),
    "itransformer": ("specs/itransformer.yaml", [], "validation MSE (loss) against the last-value forecast"),
    "lsa_icl": ("specs/lsa_icl.yaml", [], "gd_mse: distance of the predictions to one GD step (step 0: at "
                                          "initialisation)"),
    "dann": ("specs/dann.yaml", [], "target_acc: accuracy on the rotated, unlabelled domain"),
    "dann_source_only": ("specs/dann.yaml", ["--set", "train.loss=cross_entropy(logits, label, mask=domain_label "
                                                      "== 0)"], "the same recipe minus the domain loss"),
    "sla": ("specs/sla.yaml", [], "single_acc: the one-pass head; aggregated_acc: mean over four rotations"),
    "counter_current": ("specs/counter_current.yaml", [], "acc: the forward network alone; acc1: the class whose "
                                                          "feedback signal is closest at depth 1"),
    "position_prediction": ("specs/position_prediction.yaml", [], "position_acc: each patch's position out of 16 "
                                                                  "(chance 1/16), keys from 4 patches drawn afresh "
                                                                  "each step"),
    "bt2": ("specs/bt2.yaml", [], "compat_cos: cosine of the new embedding's old dimensions to the old model's"),
    "icl_gpt": ("specs/icl_gpt.yaml", [], "distances of the in-context predictions to least squares, ridge and "
                                          "one GD step; zero_loss: predicting 0"),
    "codegen2": ("specs/codegen2.yaml", [], "span corruption: exact = every token of the spans right (teacher "
                                            "forcing)"),
    "splatflow": ("specs/splatflow.yaml", [], "epe: end-point error of the last step's flow, pixels; epe_zero: "
                                              "the zero-flow error"),
}


def run(name: str, work: Path) -> dict:
    spec, extra, note = RECIPES[name]
    out = work / name
    cmd = [sys.executable, "-m", "specc.cli", "train", spec, "-o", str(out), "--threads", "1", "--quiet", *extra]
    began = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, NO_COLOR="1"))
    wall = time.perf_counter() - began
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stderr}")
    evals = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x.get("split") == "val"]
    shown = "specc train " + " ".join(shlex.quote(a) for a in [spec, "-o", f"runs/{name}", *extra])
    return {"name": name, "command": shown, "steps": evals[-1]["step"], "wall": wall, "first": evals[0],
            "last": evals[-1], "note": note}


def section(rows: list[dict]) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [BEGIN, "## Training recipes", "",
             f"One run of `python -m specc.train.bench` on {platform.machine()} with {os.cpu_count()} cores, one "
             f"torch thread per run, load average {load:.1f} at the end (the machine was shared); wall time "
             f"includes starting Python and building RUN/model/. Metrics are the last evaluation on the validation "
             f"split (step 0: before training).", "",
             "| recipe | command | steps | wall | validation metrics (step 0 -> last) | what it shows |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        metrics = ", ".join(f"{k} {r['first'][k]:.4g} -> {v:.4g}" for k, v in r["last"].items()
                            if k not in ("step", "split"))
        lines.append(f"| {r['name']} | `{r['command']}` | {r['steps']} | {r['wall']:.0f} s | {metrics} | {r['note']} |")
    lines.append(END)
    return "\n".join(lines)


def write(text: str, path: Path) -> None:
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specc.train.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated recipes: " + ", ".join(RECIPES))
    ap.add_argument("--print", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        ap.error(f"unknown recipes: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="specc-train-bench-") as work:
        rows = []
        for name in names:
            rows.append(run(name, Path(work)))
            print(f"{name}: {rows[-1]['wall']:.0f} s, {rows[-1]['last']}", flush=True)
    text = section(rows)
    if args.print:
        print(text)
    else:
        write(text, ROOT / "BENCHMARKS.md")
        print("wrote the Training recipes section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
