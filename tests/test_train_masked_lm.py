"""masked_lm(): BERT's masked-LM data with padding. The fields have the declared dtypes and ranges, padding
is a suffix that `valid` marks, only valid positions are predicted (at least one per sample, BERT's count),
the inputs differ from the targets only there and in BERT's 80/10/10 proportions, the data is a function
of the seed, bad arguments are located errors at `specc check`, and a BERT-style encoder spec trains on it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from specc.train import data as D

GEN = D.GENERATORS["masked_lm"]


def _make(seed: int = 0, **args) -> tuple[dict, dict[str, np.ndarray]]:
    bound = GEN.bind(args)
    return bound, D.generate(GEN, bound, seed)


def test_special_tokens_and_declared_fields():
    t = D.masked_lm_tokens(8)
    assert (t.end, t.pad, t.mask, t.vocab) == (8, 9, 10, 11)
    bound, a = _make(n=300, length=20, min_length=4)
    declared = GEN.fields(bound)
    assert declared == {"tokens": ("i64", (20,), (0, 11)), "targets": ("i64", (20,), (0, 10)),
                        "mask": ("bool", (20,), None), "valid": ("bool", (20,), None)}
    assert a.keys() == declared.keys()
    for k, (dtype, shape, rng) in declared.items():
        assert a[k].dtype == {"i64": np.int64, "bool": np.bool_}[dtype] and a[k].shape == (300, *shape), k
        if rng is not None:
            assert rng[0] <= a[k].min() and a[k].max() < rng[1], k
    # every id occurs where it should: MASK only in the input, PAD in both, the text ids in both
    assert (a["tokens"] == t.mask).any() and not (a["targets"] == t.mask).any()
    assert (a["targets"] == t.pad).any() and (a["targets"] == t.end).any()


def test_padding_is_a_suffix_that_valid_marks():
    t = D.masked_lm_tokens(5)
    bound, a = _make(n=2000, alphabet=5, length=16, min_length=6)
    valid, targets, tokens = a["valid"], a["targets"], a["tokens"]
    lengths = valid.sum(1)
    assert (valid == (np.arange(16)[None, :] < lengths[:, None])).all()  # a prefix of each row
    assert lengths.min() == 6 and lengths.max() == 16  # both ends of [min_length, length] are drawn
    assert len(np.unique(lengths)) == 11
    assert ((targets == t.pad) == ~valid).all() and ((tokens == t.pad) == ~valid).all()
    assert (targets[valid] <= t.end).all()  # the text: symbols and the end of word
    # the text is automaton text: words of 2 to 8 symbols between end-of-word tokens
    row = targets[0][valid[0]].tolist()
    words = "".join("|" if x == t.end else "s" for x in row).split("|")
    assert all(2 <= len(w) <= 8 for w in words[1:-1]) and 1 <= len(words[0]) <= 8


def test_predicted_positions_are_valid_and_counted_as_bert():
    bound, a = _make(n=3000, length=24, min_length=1, mask_ratio=0.15)
    mask, valid = a["mask"], a["valid"]
    assert not (mask & ~valid).any()
    lengths = valid.sum(1)
    count = mask.sum(1)
    assert (count >= 1).all()
    assert (count == np.maximum(1, np.floor(0.15 * lengths + 0.5))).all()  # max(1, round half up)
    assert (count == D.masked_count(0.15, lengths)).all()
    assert count[lengths == 1].tolist() == [1] * int((lengths == 1).sum()) and (lengths == 1).any()
    # a uniform subset of the valid positions: on rows of one length every position is chosen 3 times
    # in 20 (standard error 0.006 over 4,000 rows; the bound is 5 of them)
    _, full = _make(seed=1, n=4000, length=20, min_length=20, mask_ratio=0.15)
    assert (full["mask"].sum(1) == 3).all()
    assert np.abs(full["mask"].mean(0) - 0.15).max() < 0.03
    # mask_ratio=1: every valid position is predicted
    _, b = _make(n=50, length=10, min_length=3, mask_ratio=1.0)
    assert (b["mask"] == b["valid"]).all()


def test_inputs_differ_from_targets_only_at_predicted_positions():
    _, a = _make(n=1000, length=20)
    assert (a["tokens"][~a["mask"]] == a["targets"][~a["mask"]]).all()


def test_mask_ratio_and_the_80_10_10_split_hold():
    k = 8
    t = D.masked_lm_tokens(k)
    _, a = _make(seed=3, n=4000, alphabet=k, length=32, min_length=8, mask_ratio=0.15)
    mask, tokens, targets = a["mask"], a["tokens"], a["targets"]
    ratio = mask.sum() / a["valid"].sum()
    assert abs(ratio - 0.15) < 0.01  # rounding per sample moves it a little
    m = int(mask.sum())  # about 12,000 positions: the standard error of a share near 0.1 is 0.003
    got, want = tokens[mask], targets[mask]
    masked = (got == t.mask).mean()
    assert abs(masked - 0.8) < 0.02
    # a random replacement is a symbol in range(alphabet); it equals the original with chance 1/k when
    # the original is a symbol (never when it is the end of word)
    assert (got[(got != t.mask) & (got != want)] < k).all()
    same_chance = (want < k).mean() / k
    changed = ((got != t.mask) & (got != want)).mean()
    unchanged = (got == want).mean()
    assert abs(changed - 0.1 * (1 - same_chance)) < 0.015, (changed, m)
    assert abs(unchanged - (0.1 + 0.1 * same_chance)) < 0.015, (unchanged, m)
    assert D.MLM_SPLIT == (0.8, 0.1, 0.1)


def test_the_data_is_a_function_of_the_seed():
    _, a = _make(seed=7, n=200, length=16)
    _, b = _make(seed=7, n=200, length=16)
    _, c = _make(seed=8, n=200, length=16)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert not np.array_equal(a["valid"], c["valid"])


def test_automata_data_is_unchanged_by_sharing_its_walks():
    """automata(), span_corruption(source="automata") and masked_lm() draw their text from one function;
    the first two make the samples they made before it was shared (values recorded from that code)."""
    g = D.GENERATORS["automata"]
    a = D.generate(g, g.bind({"n": 30, "states": 3, "alphabet": 6, "length": 17}), 0)
    assert a["tokens"][:2].tolist() == [[3, 2, 3, 2, 2, 1, 6, 0, 5, 3, 3, 2, 2, 1, 1, 6, 2],
                                        [2, 4, 6, 3, 4, 6, 4, 2, 2, 2, 4, 1, 2, 6, 2, 5, 6]]
    assert (a["tokens"][:, 1:] == a["targets"][:, :-1]).all()
    g = D.GENERATORS["span_corruption"]
    s = D.generate(g, g.bind({"n": 40, "length": 12, "vocab": 6, "spans": 2, "source": "automata"}), 0)
    assert s["original"][:2].tolist() == [[1, 1, 4, 0, 3, 1, 3, 0, 5, 2, 3, 3], [4, 4, 2, 2, 2, 4, 5, 2, 0, 2, 5, 2]]


@pytest.mark.parametrize("args, arg, message", [
    ({"min_length": 40, "length": 32}, "min_length", "'min_length' (40) exceeds 'length' (32)"),
    ({"mask_ratio": 1.5}, "mask_ratio", "'mask_ratio' must be in (0, 1]"),
    ({"mask_ratio": 0.0}, "mask_ratio", "'mask_ratio' must be positive, got 0.0"),
    ({"mask_ratio": -0.1}, "mask_ratio", "'mask_ratio' must be positive, got -0.1"),
    ({"alphabet": 0}, "alphabet", "'alphabet' must be positive, got 0"),
    ({"min_length": 0}, "min_length", "'min_length' must be positive, got 0"),
    ({"states": 0}, "states", "'states' must be positive, got 0"),
])
def test_bad_arguments_name_the_argument(args, arg, message):
    with pytest.raises(D.ArgError) as e:
        GEN.bind(args)
    assert message in str(e.value) and e.value.arg == arg


SPEC = """\
specc: 1
name: bert_mlm
params:
  alphabet: 6
  block_size: 16
  d_model: 32
  heads: 2
  layers: 2
  dropout: 0.0
dims:
  B: 2
  T: {example: 12, max: block_size}
inputs:
  tokens: i64[B, T] in range(alphabet + 3)
  valid: bool[B, T]
blocks:
  block(x, mask): |
    x = x + attention(layer_norm(x), heads=heads, mask=mask, dropout=dropout)
    return x + mlp(layer_norm(x), hidden=4 * d_model, act=gelu, dropout=dropout)
graph: |
  tok = embedding(tokens, alphabet + 3, d_model, init=normal(0.02))
  pos = embedding(arange(T), block_size, d_model, init=normal(0.02))
  h = dropout(tok + pos, p=dropout)
  h = repeat(layers, block, h, mask=valid[:, None, :])
  logits = linear(layer_norm(h), alphabet + 3, tie=tok)
outputs:
  logits: f32[B, T, alphabet + 3]
seed: 0
train:
  data: masked_lm(alphabet=alphabet, length=block_size, min_length=4, mask_ratio=0.15, n=256)
  feed: {tokens: tokens, valid: valid}
  loss: cross_entropy(logits, targets, mask=mask)
  optimizer: adamw(lr=0.002)
  steps: 20
  batch: 16
  eval:
    every: 10
    metrics:
      masked_acc: accuracy(logits, targets, mask=mask)
"""


def test_check_locates_bad_masked_lm_arguments(tmp_path, capsys):
    from specc.cli import main

    spec = tmp_path / "spec.yaml"
    line = next(i for i, s in enumerate(SPEC.splitlines(), 1) if "masked_lm(" in s)
    for bad, arg in [("min_length=4", "min_length=20"), ("mask_ratio=0.15", "mask_ratio=1.5"),
                     ("alphabet=alphabet,", "alphabet=0,")]:
        text = SPEC.replace(bad, arg, 1)
        spec.write_text(text)
        assert main(["check", str(spec), "--no-color"]) == 2, arg
        err = capsys.readouterr().err
        col = text.splitlines()[line - 1].index(arg) + 1
        assert f"spec.yaml:{line}:{col}: error: data: masked_lm(): '{arg.split('=')[0]}'" in err, err
        assert "Traceback" not in err


def test_padding_does_not_change_the_encoders_outputs(tmp_path):
    """The spec's attention mask valid[:, None, :] keeps padding out of every query's keys: changing the
    padded tokens leaves the outputs at the valid positions as they were."""
    import torch

    import specc

    spec = tmp_path / "bert_mlm.yaml"
    spec.write_text(SPEC)
    model = specc.load(str(spec))
    _, a = _make(n=4, alphabet=6, length=16, min_length=4)
    tokens, valid = torch.from_numpy(a["tokens"]), torch.from_numpy(a["valid"])
    other = torch.where(valid, tokens, torch.randint(0, 9, tokens.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        x, y = model(tokens, valid), model(other, valid)
    assert (other != tokens).any()
    assert torch.allclose(x[valid], y[valid], atol=1e-5)
    assert not torch.allclose(x[~valid], y[~valid], atol=1e-5)


def test_a_bert_style_encoder_trains_on_masked_lm(tmp_path, capsys):
    from specc.cli import main

    spec = tmp_path / "bert_mlm.yaml"
    spec.write_text(SPEC)
    run = tmp_path / "run"
    assert main(["train", str(spec), "-o", str(run), "--until", "3", "--quiet"]) == 0, capsys.readouterr().err
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [d for d in lines if d.get("split") != "val"]
    assert [d["step"] for d in steps] == [1, 2, 3]
    assert all(math.isfinite(d["loss"]) for d in steps)
    first = next(d for d in lines if d.get("split") == "val")
    assert first["step"] == 0 and 0.0 <= first["masked_acc"] <= 1.0
    assert abs(first["loss"] - math.log(9)) < 0.5  # small initial weights: about uniform over the 9 ids
    assert any((run / "checkpoints").iterdir())
