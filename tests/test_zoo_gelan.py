"""specs/gelan.yaml (SEEDS.md row 1): YOLOv9's GELAN backbone and neck, a DDetect head, and the PGI
auxiliary reversible branch marked training-only.

- RepConv re-parameterisation: at -O2 (fold_batch_norm + merge_parallel_convs) every RepConvN is one
  3x3 conv2d (no batch_norm, no branch sum left), and the -O2 model gives the -O0 model's eval outputs
  (specc.verify: float64 -O0 reference on perturbed weights and BN statistics; the float32 candidate
  within 1e-4 + 1e-4 |reference|).
- Deploy graph: dropping the training-only auxiliary branch leaves the main outputs bit for bit the same
  (same weights, the same operations) and far fewer parameters; at YOLOv9-C's widths the two counts are
  the paper's (51.3M with the branch, 25.3M without; GELAN-C 25.5M) within 1%.
- Width/depth presets (scales t, s, m) through --set scale=...
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

import specc
from specc.compiler.passes import PassContext, optimize
from specc.compiler.printer import print_graph
from specc.verify import verify

NAME = "gelan"
ELANS_MAIN, ELANS_AUX = 8, 4  # RepNCSPELAN4 stages: backbone 4 + neck 4; auxiliary backbone 4


def zoo_spec() -> Path:
    return Path(__file__).resolve().parents[1] / "specs" / f"{NAME}.yaml"


def ir(zoo, opt_level: int, deploy: bool = False, **overrides) -> str:
    graph, _ = optimize(specc.compile(zoo.spec(NAME), **overrides), PassContext(opt_level=opt_level, deploy=deploy))
    return print_graph(graph, show_span=False)


def rep_conv_ops(text: str) -> dict[str, Counter]:
    """For each RepConvN instance (its path up to '.rep_conv'), the ops computed inside it."""
    found: dict[str, Counter] = {}
    for m in re.finditer(r"= (\w+)\(.*?@(\S*\.rep_conv)\.", text):
        found.setdefault(m.group(2), Counter())[m.group(1)] += 1
    return found


def test_repconv_reparameterised_into_one_conv_each(zoo):
    for scale, n in (("t", 1), ("m", 2)):
        o0, o2 = rep_conv_ops(ir(zoo, 0, scale=scale)), rep_conv_ops(ir(zoo, 2, scale=scale))
        count = 2 * n * (ELANS_MAIN + ELANS_AUX)  # two RepNCSP per ELAN, n bottlenecks each
        assert len(o0) == len(o2) == count
        assert all(ops == Counter(conv2d=2, batch_norm=2) for ops in o0.values())  # 3x3 + BN, 1x1 + BN
        assert all(ops == Counter(conv2d=1) for ops in o2.values()), o2  # one 3x3 conv
    full = ir(zoo, 2, scale="t")
    assert "batch_norm" not in full and re.search(r"kernel=\[3, 3\].*rep_conv\.conv2d ", full)


def test_o2_equals_o0_in_eval(zoo):
    report = verify(zoo.spec(NAME), examples=3, opt_level=2, overrides={"scale": "t", "size": 32})
    assert report.ok, report


def test_deploy_graph_keeps_the_main_outputs_with_far_fewer_parameters(zoo, tmp_path, perturb, count_params):
    full_dir = specc.build(zoo.spec(NAME), tmp_path / "full", opt_level=0, scale="t", size=32)
    dep_dir = specc.build(zoo.spec(NAME), tmp_path / "deploy", opt_level=0, deploy=True, scale="t", size=32)
    _, full = zoo.load_dir(full_dir)
    module, dep = zoo.load_dir(dep_dir)
    state = full.state_dict()  # BN statistics and biases away from their initial values
    state.update(perturb({k: v for k, v in state.items() if v.is_floating_point()}))
    full.load_state_dict(state)
    kept = dep.state_dict().keys()
    dep.load_state_dict({k: v for k, v in state.items() if k in kept})
    assert not any(k.startswith(("r3.", "r4", "r5", "a2.", "a3.", "a4.", "a5.", "aux")) for k in kept)
    (img,) = module.example_inputs(seed=3)
    with torch.no_grad():
        got, want = dep(img), full(img)
    assert len(got) == 3 and len(want) == 6
    for g, w in zip(got, want[:3]):
        assert torch.equal(g, w)
    assert count_params(dep) < 0.65 * count_params(full)
    s = specc.check(zoo.spec(NAME), scale="t", size=32)
    assert (s.params, s.deploy.params) == (count_params(full), count_params(dep))
    assert [o.name for o in s.deploy.outputs] == ["det3", "det4", "det5"]


def test_parameter_counts_at_yolov9_c_widths():
    """w=64, 80 classes, reg_max=16 (YOLOv9-C): 51.3M parameters with the auxiliary branch, 25.3M
    without (the paper; GELAN-C, the same main branch, 25.5M). specc check allocates nothing."""
    s = specc.check(zoo_spec(), w=64, classes=80, reg_max=16, size=640)
    assert abs(s.params - 51.3e6) <= 0.01 * 51.3e6, s.params
    assert abs(s.deploy.params - 25.3e6) <= 0.01 * 25.3e6, s.deploy.params
    assert s.deploy.example_flops < 0.6 * s.example_flops


def test_scales_select_width_and_depth():
    counts = {sc: specc.check(zoo_spec(), scale=sc).params for sc in ("t", "s", "m")}
    assert counts["t"] < counts["s"] < counts["m"]
    assert specc.check(zoo_spec(), scale="t").params == specc.check(zoo_spec()).params  # the default preset
    shapes = [o.example_shape for o in specc.check(zoo_spec(), scale="t", size=96, classes=3).outputs]
    assert shapes == [(2, 19, 12, 12), (2, 19, 6, 6), (2, 19, 3, 3)] * 2


def test_cli_builds_and_runs(zoo):
    out = zoo.build_cli(NAME, "scale=s", "size=32", run=True)
    manifest = zoo.manifest(out)
    assert manifest["params"]["w"] == 16 and manifest["params"]["scale"] == "s"
    module, model = zoo.load_dir(out)
    with torch.no_grad():
        outs = model(*module.example_inputs())
    assert [tuple(t.shape) for t in outs] == [(2, 20, 4, 4), (2, 20, 2, 2), (2, 20, 1, 1)] * 2
