"""specs/set_prompting.yaml (SEEDS.md row 11, set-based prompting): the suffix's outputs are invariant
under permutation of the parallel segments; so are each segment's own outputs. The position ids and
the mask are checked against their definition (positions restart at len(prefix) in each segment; the
suffix continues after the longest segment; no segment sees another).

Tolerance: float64 runs of the generated model: max abs error <= 1e-12 between orders (the same
arithmetic on the same values, in other rows). Float32 against float64: <= 1e-4 (logits of order one).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import specc
from conftest import SPECS

SPEC = SPECS / "set_prompting.yaml"
TOL = 1e-12
VOCAB, SUFFIX = 50, 4  # seg id of the suffix: segments + 1
PREFIX, SEGMENTS, AFTER = [5, 6, 7], [[10, 11, 12, 13], [20, 21], [30, 31, 32]], [40, 41, 42]


@pytest.fixture(scope="module")
def model():
    return specc.load(SPEC).double()


def prompt(order, relabel=False):
    """ids and seg ids [1, T] of prefix + segments in `order` + suffix. Segment i keeps the label i + 1,
    or (relabel) takes the label of its place in the new order."""
    ids, seg = list(PREFIX), [0] * len(PREFIX)
    for place, i in enumerate(order):
        ids += SEGMENTS[i]
        seg += [(place if relabel else i) + 1] * len(SEGMENTS[i])
    ids += AFTER
    seg += [SUFFIX] * len(AFTER)
    return torch.tensor([ids]), torch.tensor([seg])


def rows(order):
    """Row ranges of each segment and of the suffix in a prompt of `order`."""
    start, out = len(PREFIX), {}
    for i in order:
        out[i] = slice(start, start + len(SEGMENTS[i]))
        start += len(SEGMENTS[i])
    out["suffix"] = slice(start, start + len(AFTER))
    return out


@pytest.mark.parametrize("relabel", [False, True], ids=["labels-move", "labels-renumbered"])
def test_outputs_are_invariant_under_permutation_of_the_segments(model, relabel):
    base_order = (0, 1, 2)
    with torch.no_grad():
        base, _ = model(*prompt(base_order))
    base_rows = rows(base_order)
    for order in itertools.permutations(range(3)):
        with torch.no_grad():
            logits, _ = model(*prompt(order, relabel))
        r = rows(order)
        assert (logits[0, r["suffix"]] - base[0, base_rows["suffix"]]).abs().max().item() <= TOL
        assert (logits[0, :3] - base[0, :3]).abs().max().item() <= TOL  # the prefix
        for i in range(3):
            assert (logits[0, r[i]] - base[0, base_rows[i]]).abs().max().item() <= TOL


def test_position_ids_restart_in_each_segment(model):
    with torch.no_grad():
        _, positions = model(*prompt((2, 0, 1)))
    # prefix 0..2; segments of lengths 3, 4, 2 each from 3; the suffix after the longest (3 + 4)
    assert positions[0].tolist() == [0, 1, 2] + [3, 4, 5] + [3, 4, 5, 6] + [3, 4] + [7, 8, 9]


def test_segments_do_not_see_each_other_but_the_suffix_sees_all(model):
    ids, seg = prompt((0, 1, 2))
    r = rows((0, 1, 2))
    changed = ids.clone()
    changed[0, r[0].start + 1] = 49  # a token of segment 0
    with torch.no_grad():
        before, _ = model(ids, seg)
        after, _ = model(changed, seg)
    for i in (1, 2):
        assert (after[0, r[i]] - before[0, r[i]]).abs().max().item() <= TOL
    assert (after[0, r["suffix"]] - before[0, r["suffix"]]).abs().max().item() > 1e-3
    assert (after[0, r[0].start + 1:r[0].stop] - before[0, r[0].start + 1:r[0].stop]).abs().max().item() > 1e-3
    assert torch.equal(after[0, :r[0].start + 1], before[0, :r[0].start + 1])  # before the change: causal


def test_order_matters_without_the_set_structure(model):
    """The same tokens labelled as one ordinary segment: a plain causal decoder, which is order dependent."""
    outs = []
    for order in ((0, 1, 2), (2, 1, 0)):
        ids, seg = prompt(order)
        seg = torch.where((seg > 0) & (seg < SUFFIX), 1, seg)
        with torch.no_grad():
            outs.append(model(ids, seg)[0][0, -3:])
    assert (outs[0] - outs[1]).abs().max().item() > 1e-3


def test_float32_build_and_cli(zoo, model):
    out = zoo.build_cli("set_prompting", run=True)
    _, model32 = zoo.load_dir(out)
    ids, seg = prompt((1, 2, 0))
    with torch.no_grad():
        got, pos32 = model32(ids, seg)
        want, pos64 = model(ids, seg)
    assert torch.equal(pos32, pos64) and (got.double() - want).abs().max().item() <= 1e-4
    src = (out / "model.py").read_text()
    assert "torch.where(mask.unsqueeze(1), q @ k.transpose(-1, -2)" in src and 'float("-inf")' in src
