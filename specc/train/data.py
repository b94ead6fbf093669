"""Data for recipes: built-in generators of the seed papers' tasks, bundled data sets, and files.

A data source yields named fields, each an array whose first axis is the sample axis N. A
generator declares its fields (dtype and per-sample shape) from its arguments alone, so that
`specc check` can resolve the names in a loss without generating anything.

Generators (arguments with defaults; every one takes `n`, the number of samples):
- `linear_regression(points=10, dim=2, noise=0.0)`: in-context regression, one weight vector w per
  sample; `x` [N, points+1, dim], `y` [N, points+1] (the query's y last), `e` [N, points+1, dim+1]
  the tokens (x_i, y_i) with the query's y zeroed, `target` [N] the query's y.
- `arithmetic(digits=3, format="plain"|"reversed")`: "a+b=c" strings as tokens (0-9, '+'=10,
  '='=11, end=12), operands zero-padded to `digits` and the sum to digits+1 (reversed: the sum's
  digits written last-first); `tokens`, `targets` (the next token) [N, 3*digits+3], `mask` (answer
  positions).
- `sequences(task="copy"|"sort"|"histogram", length=8, vocab=8)`: copy and sort as prompt, separator
  (token `vocab`) and answer with `tokens`/`targets`/`mask`; histogram as per-position labels (the
  count of each token in its sequence), `mask` all true.
- `automata(states=4, alphabet=4, length=64)`: each sample a random finite automaton's strings
  (random walks, separated by token `alphabet`); next-token `tokens`/`targets`/`mask`.
- `seasonal(variates=7, lookback=96, horizon=24, periods=[24, 168], noise=0.1)`: windows of one
  multivariate series (shared seasonal components mixed per variate, a trend, AR(1) noise); `x`
  [N, lookback, variates], `target` [N, horizon, variates]; ordered (validation is the last windows,
  after a gap of lookback + horizon - 1 windows, so that no validation value was seen in training).
- `two_moons(rotation=30.0, noise=0.1)`: half the samples from the source domain, half from the
  target domain rotated by `rotation` degrees; `x` [N, 2], `label`, `domain_label` (0 source, 1 target).
- `flow_pairs(height=16, width=16, channels=3, max_flow=2.0)`: two-frame optical flow with a known answer.
  `img2` [N, channels, H, W] is a random smooth image (per channel a sum of 8 plane waves of random
  direction, phase and wavelength 4 to 12 pixels, about unit variance), `flow_gt` [N, 2, H, W] a random
  smooth flow in pixels (channel 0 along W, 1 along H: a translation plus two waves of wavelength one to
  two image sides; each channel within max_flow), and `img1` the same waves evaluated at p + flow_gt(p),
  so img1(p) = img2(p + flow_gt(p)) exactly: the flow that backward-warping img2 (the `warp` operator) to
  img1 needs. Nothing is downloaded.
- `digits()`: scikit-learn's 8x8 digits (1,797 images), `x` [N, 1, 8, 8] in [0, 1], `label`;
  with `rotations=true` also `rotated` [N, 4, 1, 8, 8] (0, 90, 180, 270 degrees) and `joint`
  [N, 4] = 4 * label + rotation (self-supervised label augmentation).
- `digit_patches(patch=2, mask_ratio=0.75)`: the 8x8 digits cut into T = (8 / patch)^2 patches for
  position prediction (MP3): `x` [N, 1, 8, 8], `label`, `position` [N, T] = 0..T-1 (each patch's
  index in row-major order: the class of a per-patch position classifier), `keep` [N, T] bool, the
  patches whose keys and values attention may use: a seeded random subset of exactly
  T - mask_ratio * T patches per image (rounded half up; at least one).
- `statsmodels(name="sunspots"|"co2"|"nile", lookback=48, horizon=12)`: windows of a series bundled
  with statsmodels, ordered as seasonal().
- `span_corruption(length=24, vocab=16, spans=3, span_length=3, source="random"|"automata")`:
  CodeGen2's causal masked LM. Each source sequence (`length` tokens in range(vocab): uniform random,
  or a random automaton's strings with `vocab - 1` symbols and separator `vocab - 1`) loses `spans`
  non-overlapping spans of 1 to `span_length` tokens (seeded; spans may touch each other and the
  ends), each replaced by its sentinel; after the corrupted text come the separator, each sentinel
  followed by its span, and the end token (`corrupt()`; `reassemble()` inverts it). Tokens: source
  0..vocab-1, separator `vocab`, end `vocab + 1`, sentinel i `vocab + 2 + i`. Fields: next-token
  `tokens`/`targets`/`mask` [N, length + 2*spans + 1] (`mask`: the targets after the prefix),
  `prefix` [N] (the corrupted text and the separator: the bidirectional part of a prefix-LM),
  `original` [N, length].
- `masked_lm(states=4, alphabet=8, length=32, min_length=8, mask_ratio=0.15)`: BERT's masked LM with
  padding. Each sample is a random automaton's text (as automata(): symbols 0..alphabet-1, end of word
  `alphabet`) cut to a seeded length in [min_length, length] and padded to `length` with PAD =
  alphabet + 1; MASK = alphabet + 2, so the vocabulary is alphabet + 3 (`masked_lm_tokens()`). Of each
  sample's L valid tokens, max(1, round(mask_ratio * L)) positions (a uniform random subset) are to be
  predicted, and of those 80% read MASK in the input, 10% a random symbol in range(alphabet) (possibly
  the original) and 10% the original (`MLM_SPLIT`). Fields [N, length]: `tokens` the input,
  `targets` the uncorrupted ids (PAD on padding), `mask` the positions to predict (valid ones only, at
  least one per sample), `valid` true where not padding (a prefix of each row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

#: A field's declaration: (dtype, per-sample shape, value range of integer fields or None).
FieldType = tuple[str, tuple[int, ...], tuple[int, int] | None]


class ArgError(ValueError):
    """A bad generator argument; `arg` names it (None: the call as a whole)."""

    def __init__(self, arg: str | None, message: str):
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class Generator:
    """A built-in data source: its arguments with defaults, its fields, and the function making it."""

    name: str
    defaults: dict[str, Any]
    fields: Callable[[dict[str, Any]], dict[str, FieldType]]
    make: Callable[[dict[str, Any], np.random.Generator], dict[str, np.ndarray]]
    ordered: bool = False
    #: For ordered data: how many samples to leave out between the training and the validation
    #: samples so that no value of a validation window was seen in training (overlapping windows).
    gap: Callable[[dict[str, Any]], int] = lambda args: 0
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Numeric arguments that may be zero (all others must be positive).
    zero_ok: tuple[str, ...] = ()

    def bind(self, given: dict[str, Any]) -> dict[str, Any]:
        """The arguments with defaults filled in, each checked; raises ArgError."""
        args = dict(self.defaults)
        for k, v in given.items():
            if k not in args:
                raise ArgError(k, f"{self.name}() has no argument '{k}'; it takes {', '.join(args)}")
            want = self.defaults[k]
            if isinstance(want, bool) != isinstance(v, bool) or \
                    (isinstance(want, (int, float)) and not isinstance(v, (int, float))) or \
                    (isinstance(want, int) and not isinstance(want, bool) and not isinstance(v, int)) or \
                    (isinstance(want, str) and not isinstance(v, str)) or \
                    (isinstance(want, list) and not (isinstance(v, list) and all(isinstance(i, (int, float))
                                                                                  and not isinstance(i, bool)
                                                                                  for i in v))):
                raise ArgError(k, f"{self.name}(): '{k}' must be {_kind(want)}, got {v!r}")
            if k in self.choices and v not in self.choices[k]:
                raise ArgError(k, f"{self.name}(): '{k}' must be one of {', '.join(map(repr, self.choices[k]))}, "
                                  f"got {v!r}")
            args[k] = float(v) if isinstance(want, float) else v
        for k, v in args.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("noise", "rotation") and \
                    (v < 0 if k in self.zero_ok else v <= 0):
                kind = "zero or more" if k in self.zero_ok else "positive"
                raise ArgError(k if k in given else None, f"{self.name}(): '{k}' must be {kind}, got {v}")
            if k in ("noise", "rotation") and isinstance(v, float) and not math.isfinite(v):
                raise ArgError(k, f"{self.name}(): '{k}' must be finite")
        if args["n"] > MAX_SAMPLES:
            raise ArgError("n", f"{self.name}(): at most {MAX_SAMPLES:,} samples, got {args['n']:,}")
        for k, v in args.items():
            if isinstance(v, list) and len(v) > MAX_LIST:
                raise ArgError(k, f"{self.name}(): at most {MAX_LIST} values in '{k}', got {len(v)}")
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_SAMPLES:
                raise ArgError(k, f"{self.name}(): '{k}' is too large (at most {MAX_SAMPLES:,}), got {v:,}")
        elements = sum(args["n"] * math.prod(shape) for _, shape, _ in self.fields(args).values())
        if elements > MAX_ELEMENTS:
            raise ArgError(None, f"{self.name}(): the data would hold {elements:,} values, more than "
                                 f"{MAX_ELEMENTS:,}; lower n or the sizes")
        return args


MAX_SAMPLES = 1_000_000
#: The most values (over all fields) a generator may make: 2^28, 1 GiB of float32.
MAX_ELEMENTS = 1 << 28
MAX_LIST = 64


def _kind(v: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of numbers"}[type(v)]


def _lm(seqs: np.ndarray, answer_from: int) -> dict[str, np.ndarray]:
    """Next-token fields of token sequences whose answer starts at position `answer_from`."""
    tokens, targets = seqs[:, :-1], seqs[:, 1:]
    mask = np.zeros(targets.shape, dtype=bool)
    mask[:, answer_from - 1:] = True
    return {"tokens": tokens.astype(np.int64), "targets": targets.astype(np.int64), "mask": mask}


def _lm_fields(length: int, vocab: int) -> dict[str, FieldType]:
    return {"tokens": ("i64", (length,), (0, vocab)), "targets": ("i64", (length,), (0, vocab)),
            "mask": ("bool", (length,), None)}


# --- in-context linear regression ------------------------------------------------------------

def _lr_fields(a):
    p, d = a["points"] + 1, a["dim"]
    return {"x": ("f32", (p, d), None), "y": ("f32", (p,), None), "e": ("f32", (p, d + 1), None),
            "target": ("f32", (), None)}


def _lr_make(a, rng):
    n, p, d = a["n"], a["points"] + 1, a["dim"]
    w = rng.standard_normal((n, d))
    x = rng.uniform(-1.0, 1.0, (n, p, d))
    y = np.einsum("npd,nd->np", x, w) + a["noise"] * rng.standard_normal((n, p))
    e = np.concatenate([x, y[..., None]], axis=-1)
    e[:, -1, -1] = 0.0
    return {"x": x.astype(np.float32), "y": y.astype(np.float32), "e": e.astype(np.float32),
            "target": y[:, -1].astype(np.float32)}


# --- arithmetic ----------------------------------------------------------------------------

PLUS, EQUALS, END = 10, 11, 12


def _ar_fields(a):
    return _lm_fields(3 * a["digits"] + 3, 13)


def _ar_make(a, rng):
    d, n = a["digits"], a["n"]
    if n > 10 ** (2 * d):
        raise ArgError("n", f"arithmetic(): only {10 ** (2 * d):,} distinct problems have {d} digits")
    pairs = rng.choice(10 ** (2 * d), size=n, replace=False)
    x, y = pairs // 10 ** d, pairs % 10 ** d
    z = x + y

    def digits_of(v, k):
        return np.stack([(v // 10 ** (k - 1 - i)) % 10 for i in range(k)], axis=1)

    answer = digits_of(z, d + 1)
    if a["format"] == "reversed":
        answer = answer[:, ::-1]
    seqs = np.concatenate([digits_of(x, d), np.full((n, 1), PLUS), digits_of(y, d), np.full((n, 1), EQUALS),
                           answer, np.full((n, 1), END)], axis=1)
    return _lm(seqs, 2 * d + 2)


def decode_arithmetic(tokens) -> str:
    """The text of arithmetic tokens (for reading samples)."""
    return "".join("0123456789+=$"[int(t)] for t in tokens)


# --- copy / sort / histogram ---------------------------------------------------------------

def _seq_fields(a):
    n_len, v = a["length"], a["vocab"]
    if a["task"] == "histogram":
        return {"tokens": ("i64", (n_len,), (0, v)), "targets": ("i64", (n_len,), (0, n_len + 1)),
                "mask": ("bool", (n_len,), None)}
    return _lm_fields(2 * n_len, v + 1)


def _seq_make(a, rng):
    n, length, v = a["n"], a["length"], a["vocab"]
    x = rng.integers(0, v, (n, length))
    if a["task"] == "histogram":
        counts = (x[:, :, None] == x[:, None, :]).sum(-1)
        return {"tokens": x.astype(np.int64), "targets": counts.astype(np.int64), "mask": np.ones(x.shape, bool)}
    answer = x if a["task"] == "copy" else np.sort(x, axis=1)
    return _lm(np.concatenate([x, np.full((n, 1), v), answer], axis=1), length + 1)


# --- random finite automata ----------------------------------------------------------------

def _fa_fields(a):
    return _lm_fields(a["length"], a["alphabet"] + 1)


def _fa_walks(rng: np.random.Generator, n: int, states: int, alphabet: int, length: int) -> np.ndarray:
    """`n` token streams of `length` tokens [n, length] int64, each from a random finite automaton of its
    own (`states` states over the symbols range(alphabet), each state allowing about half of them): words
    of 2 to 8 symbols, each a random walk from state 0 followed by the end-of-word token `alphabet`. The
    one source of automaton text, so that automata(), span_corruption() and masked_lm() draw alike."""
    q, k = states, alphabet
    seqs = np.empty((n, length), dtype=np.int64)
    for i in range(n):
        allowed = rng.random((q, k)) < 0.5
        allowed[np.arange(q), rng.integers(0, k, q)] = True  # every state has a way out
        nxt = rng.integers(0, q, (q, k))
        out: list[int] = []
        while len(out) < length:
            state, words = 0, rng.integers(2, 9)
            for _ in range(words):
                sym = rng.choice(np.flatnonzero(allowed[state]))
                out.append(int(sym))
                state = nxt[state, sym]
            out.append(k)
        seqs[i] = out[:length]
    return seqs


def _fa_make(a, rng):
    seqs = _fa_walks(rng, a["n"], a["states"], a["alphabet"], a["length"] + 1)
    tokens, targets = seqs[:, :-1], seqs[:, 1:]
    return {"tokens": tokens, "targets": targets, "mask": np.ones(targets.shape, bool)}


# --- span corruption with sentinels (CodeGen2's causal masked LM) ----------------------------

def span_tokens(vocab: int, spans: int) -> tuple[int, int, list[int]]:
    """The special tokens of span corruption over source tokens range(vocab): (separator, end, sentinels)."""
    return vocab, vocab + 1, [vocab + 2 + i for i in range(spans)]


def corrupt(seq, spans: list[tuple[int, int]], vocab: int) -> tuple[np.ndarray, int]:
    """CodeGen2's causal-MLM layout of one sequence: each span (start, length) replaced by its sentinel,
    then the separator, each sentinel followed by its span, and the end token.

    seq: tokens in range(vocab); spans: in order along seq, non-overlapping (they may touch), each of
    length >= 1. Returns the int64 layout (len(seq) + 2 * len(spans) + 2 tokens) and the prefix length
    (the corrupted text and the separator). Raises ValueError for tokens or spans that do not fit.
    """
    seq = np.asarray(seq, dtype=np.int64)
    if seq.ndim != 1 or (seq.size and (seq.min() < 0 or seq.max() >= vocab)):
        raise ValueError(f"corrupt: expected a 1-D sequence of tokens in range({vocab})")
    sep, end, sentinels = span_tokens(vocab, len(spans))
    head: list[int] = []
    tail: list[int] = [sep]
    pos = 0
    for sentinel, (start, length) in zip(sentinels, spans):
        if length < 1 or start < pos or start + length > len(seq):
            raise ValueError(f"corrupt: the span ({start}, {length}) overlaps the one before it, is out of order "
                             f"or is empty, or ends after the sequence (length {len(seq)})")
        head += [*seq[pos:start].tolist(), sentinel]
        tail += [sentinel, *seq[start:start + length].tolist()]
        pos = start + length
    head += seq[pos:].tolist()
    return np.array(head + tail + [end], dtype=np.int64), len(head) + 1


def reassemble(layout, vocab: int) -> np.ndarray:
    """The source sequence of a span-corruption layout (the inverse of corrupt()): each sentinel of the
    corrupted text replaced by the tokens that follow the same sentinel after the separator. Tokens after
    the first end token are ignored. Raises ValueError for a layout without separator or end token, or
    whose sentinels do not match."""
    layout = [int(t) for t in np.asarray(layout).reshape(-1)]
    sep, end = vocab, vocab + 1
    if sep not in layout:
        raise ValueError(f"reassemble: no separator (token {sep})")
    cut = layout.index(sep)
    text, answer = layout[:cut], layout[cut + 1:]
    if end not in answer:
        raise ValueError(f"reassemble: no end token ({end}) after the separator")
    answer = answer[:answer.index(end)]
    filled: dict[int, list[int]] = {}
    current = None
    for t in answer:
        if t >= vocab + 2:
            if t in filled:
                raise ValueError(f"reassemble: the sentinel {t} appears twice after the separator")
            current, filled[t] = t, []
        elif current is None or t >= vocab:
            raise ValueError(f"reassemble: the token {t} after the separator follows no sentinel")
        else:
            filled[current].append(t)
    out: list[int] = []
    for t in text:
        if t >= vocab + 2:
            if t not in filled:
                raise ValueError(f"reassemble: the sentinel {t} has no span after the separator")
            out += filled.pop(t)
        elif t >= vocab:
            raise ValueError(f"reassemble: the special token {t} in the corrupted text")
        else:
            out.append(t)
    if filled:
        raise ValueError(f"reassemble: the sentinels {sorted(filled)} do not occur in the corrupted text")
    return np.array(out, dtype=np.int64)


def choose_spans(rng: np.random.Generator, length: int, spans: int, span_length: int) -> list[tuple[int, int]]:
    """`spans` random non-overlapping spans (start, length) of 1 to span_length tokens in `length`
    tokens, in order; spans may touch each other and the ends. Needs spans * span_length <= length."""
    lens = rng.integers(1, span_length + 1, spans)
    kept = length - int(lens.sum())
    before = np.sort(rng.integers(0, kept + 1, spans))  # kept tokens before each span
    starts = before + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return [(int(s), int(n)) for s, n in zip(starts, lens)]


def _sc_check(a):
    if a["spans"] * a["span_length"] > a["length"]:
        raise ArgError("spans", f"span_corruption(): spans * span_length = {a['spans'] * a['span_length']} "
                                f"exceeds length = {a['length']}")
    if a["source"] == "automata" and (a["vocab"] < 2 or a["length"] < 2):
        raise ArgError("vocab" if a["vocab"] < 2 else "length",
                       "span_corruption(): source=\"automata\" needs vocab >= 2 (symbols and a separator) "
                       "and length >= 2")


def _sc_fields(a):
    _sc_check(a)
    v, k, length = a["vocab"], a["spans"], a["length"]
    width = length + 2 * k + 1
    return {**_lm_fields(width, v + 2 + k), "prefix": ("i64", (), (1, length + 2)),
            "original": ("i64", (length,), (0, v))}


def _sc_make(a, rng):
    _sc_check(a)
    n, length, v, k = a["n"], a["length"], a["vocab"], a["spans"]
    if a["source"] == "automata":
        original = _fa_walks(rng, n, 4, v - 1, length)
    else:
        original = rng.integers(0, v, (n, length)).astype(np.int64)
    seqs = np.empty((n, length + 2 * k + 2), dtype=np.int64)
    prefix = np.empty(n, dtype=np.int64)
    for i in range(n):
        seqs[i], prefix[i] = corrupt(original[i], choose_spans(rng, length, k, a["span_length"]), v)
    out = _lm(seqs, 1)
    out["mask"] = np.arange(seqs.shape[1] - 1)[None, :] >= prefix[:, None] - 1  # targets after the prefix
    return {**out, "prefix": prefix, "original": original}


# --- masked language modelling with padding (BERT) ----------------------------------------

class MaskedLMTokens(NamedTuple):
    """The token ids of masked_lm() over symbols range(alphabet): end of word, padding, the mask token,
    and the vocabulary size (alphabet + 3)."""

    end: int
    pad: int
    mask: int
    vocab: int


def masked_lm_tokens(alphabet: int) -> MaskedLMTokens:
    """masked_lm()'s special tokens: end of word `alphabet`, PAD `alphabet + 1`, MASK `alphabet + 2`."""
    return MaskedLMTokens(alphabet, alphabet + 1, alphabet + 2, alphabet + 3)


#: BERT's corruption of the positions to predict: the share replaced by MASK, by a random symbol, and
#: left unchanged (MASK never occurs in fine-tuning inputs, so the model must keep a representation of
#: every input token, not only of the MASK positions).
MLM_SPLIT = (0.8, 0.1, 0.1)


def masked_count(ratio: float, lengths):
    """How many positions masked_lm() predicts in samples of `lengths` valid tokens: ratio * length rounded
    half up, at least one (BERT's max(1, round(ratio * tokens))). Never more than the length (ratio <= 1)."""
    return np.maximum(1, np.floor(ratio * np.asarray(lengths) + 0.5)).astype(np.int64)


def _mlm_check(a):
    if a["min_length"] > a["length"]:
        raise ArgError("min_length", f"masked_lm(): 'min_length' ({a['min_length']}) exceeds 'length' "
                                     f"({a['length']})")
    if not 0.0 < a["mask_ratio"] <= 1.0:
        raise ArgError("mask_ratio", f"masked_lm(): 'mask_ratio' must be in (0, 1] (the share of each "
                                     f"sample's tokens to predict), got {a['mask_ratio']}")


def _mlm_fields(a):
    _mlm_check(a)
    length, t = a["length"], masked_lm_tokens(a["alphabet"])
    return {"tokens": ("i64", (length,), (0, t.vocab)), "targets": ("i64", (length,), (0, t.mask)),
            "mask": ("bool", (length,), None), "valid": ("bool", (length,), None)}


def _mlm_make(a, rng):
    _mlm_check(a)
    n, length, k = a["n"], a["length"], a["alphabet"]
    t = masked_lm_tokens(k)
    lengths = rng.integers(a["min_length"], length + 1, n)
    valid = np.arange(length)[None, :] < lengths[:, None]  # padding is a suffix
    targets = np.where(valid, _fa_walks(rng, n, a["states"], k, length), t.pad)
    # a uniform random subset of masked_count() valid positions per sample: padding sorts last
    order = np.argsort(np.where(valid, rng.random((n, length)), np.inf), axis=1)
    mask = np.zeros((n, length), dtype=np.bool_)
    np.put_along_axis(mask, order, np.arange(length)[None, :] < masked_count(a["mask_ratio"], lengths)[:, None],
                      axis=1)
    how = rng.random((n, length))
    tokens = targets.copy()
    tokens[mask & (how < MLM_SPLIT[0])] = t.mask
    swap = mask & (how >= MLM_SPLIT[0]) & (how < MLM_SPLIT[0] + MLM_SPLIT[1])
    tokens[swap] = rng.integers(0, k, int(swap.sum()))  # may draw the original symbol, as in BERT
    return {"tokens": tokens.astype(np.int64), "targets": targets.astype(np.int64), "mask": mask, "valid": valid}


# --- seasonal multivariate series ----------------------------------------------------------

def _ss_fields(a):
    return {"x": ("f32", (a["lookback"], a["variates"]), None),
            "target": ("f32", (a["horizon"], a["variates"]), None)}


def _ss_make(a, rng):
    v, lb, h, n = a["variates"], a["lookback"], a["horizon"], a["n"]
    periods = [float(p) for p in a["periods"]] or [24.0]
    if any(p <= 0 for p in periods):
        raise ArgError("periods", "seasonal(): periods must be positive")
    length = n + lb + h - 1
    t = np.arange(length)
    comps = [np.sin(2 * np.pi * t / p + ph) for p in periods for ph in rng.uniform(0, 2 * np.pi, 2)]
    basis = np.stack(comps, axis=1)  # [length, components]
    mix = rng.standard_normal((basis.shape[1], v))
    trend = np.outer(t / length, rng.standard_normal(v))
    noise = np.zeros((length, v))
    eps = a["noise"] * rng.standard_normal((length, v))
    for i in range(1, length):
        noise[i] = 0.7 * noise[i - 1] + eps[i]
    series = basis @ mix + trend + noise
    return windows(series.astype(np.float32), lb, h, n)


def windows(series: np.ndarray, lookback: int, horizon: int, n: int | None = None) -> dict[str, np.ndarray]:
    """Sliding windows over a [time, variates] series: inputs `x` and the following `target`."""
    count = series.shape[0] - lookback - horizon + 1
    if count <= 0:
        raise ArgError("lookback", f"the series has {series.shape[0]} steps, fewer than lookback + horizon "
                                   f"= {lookback + horizon}")
    count = count if n is None else min(n, count)
    idx = np.arange(count)[:, None]
    x = series[idx + np.arange(lookback)]
    y = series[idx + lookback + np.arange(horizon)]
    return {"x": x.astype(np.float32), "target": y.astype(np.float32)}


# --- two moons in two domains --------------------------------------------------------------

def _tm_fields(a):
    return {"x": ("f32", (2,), None), "label": ("i64", (), (0, 2)), "domain_label": ("i64", (), (0, 2))}


def _tm_make(a, rng):
    n = a["n"]
    label = rng.integers(0, 2, n)
    angle = rng.uniform(0, np.pi, n)
    x = np.where(label[:, None] == 0, np.stack([np.cos(angle), np.sin(angle)], 1),
                 np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], 1))
    x = x + a["noise"] * rng.standard_normal((n, 2)) - np.array([0.5, 0.25])
    domain = (np.arange(n) % 2).astype(np.int64)
    r = np.deg2rad(a["rotation"])
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    x = np.where(domain[:, None] == 1, x @ rot.T, x)
    return {"x": x.astype(np.float32), "label": label.astype(np.int64), "domain_label": domain}


# --- optical flow pairs --------------------------------------------------------------------

#: flow_pairs(): plane waves per image channel and their wavelengths in pixels (the texture the
#: correlation matches), and per flow channel the waves of its smooth part (wavelengths of 1 to 2 image sides).
FLOW_WAVES, FLOW_WAVELENGTHS, FLOW_SMOOTH_WAVES = 8, (4.0, 12.0), 2


def _waves(rng: np.random.Generator, shape: tuple[int, ...], count: int, lengths: tuple[float, float]):
    """`count` random plane waves per entry of `shape`: frequency vectors [*shape, count, 2] (cycles per
    pixel along W, H) and phases [*shape, count]."""
    angle = rng.uniform(0.0, 2 * np.pi, shape + (count,))
    freq = 1.0 / rng.uniform(lengths[0], lengths[1], shape + (count,))
    return np.stack([np.cos(angle), np.sin(angle)], -1) * freq[..., None], rng.uniform(0.0, 2 * np.pi, shape + (count,))


def _wave_sum(freq: np.ndarray, phase: np.ndarray, amp: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum_k amp_k sin(2 pi (f_k . (x, y)) + phase_k) at positions x, y [N, 1, H, W] (broadcast over the
    channel axis of freq [N, C, K, 2]); [N, C, H, W]."""
    arg = 2 * np.pi * (freq[..., 0, None, None] * x[:, :, None] + freq[..., 1, None, None] * y[:, :, None]) \
        + phase[..., None, None]
    return (amp[..., None, None] * np.sin(arg)).sum(axis=2)


def _fp_fields(a):
    c, h, w = a["channels"], a["height"], a["width"]
    return {"img1": ("f32", (c, h, w), None), "img2": ("f32", (c, h, w), None), "flow_gt": ("f32", (2, h, w), None)}


def _fp_make(a, rng):
    n, c, h, w, m = a["n"], a["channels"], a["height"], a["width"], a["max_flow"]
    side = float(max(h, w))
    shift = rng.uniform(-1.0, 1.0, (n, 2, 1, 1))  # a translation and a smooth field, each channel within max_flow
    f_freq, f_phase = _waves(rng, (n, 2), FLOW_SMOOTH_WAVES, (side, 2 * side))
    f_amp = np.full((n, 2, FLOW_SMOOTH_WAVES), 1.0 / FLOW_SMOOTH_WAVES)
    y, x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    x, y = np.broadcast_to(x, (n, 1, h, w)), np.broadcast_to(y, (n, 1, h, w))
    flow = m * (0.6 * shift + 0.4 * _wave_sum(f_freq, f_phase, f_amp, x, y))
    i_freq, i_phase = _waves(rng, (n, c), FLOW_WAVES, FLOW_WAVELENGTHS)
    i_amp = rng.standard_normal((n, c, FLOW_WAVES)) * np.sqrt(2.0 / FLOW_WAVES)  # about unit variance
    img2 = _wave_sum(i_freq, i_phase, i_amp, x, y)
    img1 = _wave_sum(i_freq, i_phase, i_amp, x + flow[:, :1], y + flow[:, 1:])  # img2 at p + flow(p), exactly
    return {"img1": img1.astype(np.float32), "img2": img2.astype(np.float32), "flow_gt": flow.astype(np.float32)}


# --- bundled data sets ---------------------------------------------------------------------

def _dg_fields(a):
    f = {"x": ("f32", (1, 8, 8), None), "label": ("i64", (), (0, 10))}
    if a["rotations"]:
        f.update(rotated=("f32", (4, 1, 8, 8), None), joint=("i64", (4,), (0, 40)))
    return f


def _dg_make(a, rng):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    out = {"x": x, "label": d.target.astype(np.int64)}
    if a["rotations"]:
        out["rotated"] = np.stack([np.rot90(x, k, axes=(2, 3)) for k in range(4)], axis=1).copy()
        out["joint"] = (4 * out["label"][:, None] + np.arange(4)).astype(np.int64)
    return out


def _dp_check(a):
    """The patch grid of digit_patches(): (T, kept patches); raises ArgError."""
    if 8 % a["patch"]:
        raise ArgError("patch", f"digit_patches(): 'patch' must divide the image side 8 (1, 2, 4 or 8), "
                                f"got {a['patch']}")
    t = (8 // a["patch"]) ** 2
    if not 0.0 <= a["mask_ratio"] < 1.0 - 0.5 / t:
        raise ArgError("mask_ratio", f"digit_patches(): 'mask_ratio' must leave at least one of the {t} patches "
                                     f"(0 <= mask_ratio < {1 - 0.5 / t:g}), got {a['mask_ratio']}")
    return t, t - math.floor(a["mask_ratio"] * t + 0.5)  # mask_ratio * T patches dropped, rounded half up


def _dp_fields(a):
    t, _ = _dp_check(a)
    return {**_dg_fields({"rotations": False}), "position": ("i64", (t,), (0, t)), "keep": ("bool", (t,), None)}


def _dp_make(a, rng):
    t, kept = _dp_check(a)
    out = _dg_make({"rotations": False}, rng)
    n = len(out["x"])
    out["position"] = np.broadcast_to(np.arange(t, dtype=np.int64), (n, t)).copy()
    chosen = np.argsort(rng.random((n, t)), axis=1)[:, :kept]  # a uniform random subset of `kept` patches
    out["keep"] = np.zeros((n, t), dtype=np.bool_)
    np.put_along_axis(out["keep"], chosen, True, axis=1)
    return out


#: statsmodels data sets: module name in statsmodels.datasets and the columns used.
STATSMODELS = {"sunspots": ("sunspots", ("SUNACTIVITY",)), "co2": ("co2", ("co2",)), "nile": ("nile", ("volume",))}


def _sm_fields(a):
    v = len(STATSMODELS[a["name"]][1])
    return {"x": ("f32", (a["lookback"], v), None), "target": ("f32", (a["horizon"], v), None)}


def _sm_make(a, rng):
    import importlib

    module, columns = STATSMODELS[a["name"]]
    frame = importlib.import_module(f"statsmodels.datasets.{module}").load_pandas().data
    series = frame[list(columns)].astype("float64").interpolate().bfill().to_numpy()
    return windows(series.astype(np.float32), a["lookback"], a["horizon"])


def _window_gap(a):
    return a["lookback"] + a["horizon"] - 1


GENERATORS: dict[str, Generator] = {g.name: g for g in [
    Generator("linear_regression", {"n": 4096, "points": 10, "dim": 2, "noise": 0.0}, _lr_fields, _lr_make),
    Generator("arithmetic", {"n": 10000, "digits": 3, "format": "plain"}, _ar_fields, _ar_make,
              choices={"format": ("plain", "reversed")}),
    Generator("sequences", {"n": 4096, "task": "copy", "length": 8, "vocab": 8}, _seq_fields, _seq_make,
              choices={"task": ("copy", "sort", "histogram")}),
    Generator("automata", {"n": 2048, "states": 4, "alphabet": 4, "length": 64}, _fa_fields, _fa_make),
    Generator("seasonal", {"n": 2000, "variates": 7, "lookback": 96, "horizon": 24, "periods": [24, 168],
                           "noise": 0.1}, _ss_fields, _ss_make, ordered=True, gap=_window_gap),
    Generator("span_corruption", {"n": 4096, "length": 24, "vocab": 16, "spans": 3, "span_length": 3,
                                  "source": "random"}, _sc_fields, _sc_make,
              choices={"source": ("random", "automata")}, zero_ok=("spans",)),
    Generator("masked_lm", {"n": 2048, "states": 4, "alphabet": 8, "length": 32, "min_length": 8,
                            "mask_ratio": 0.15}, _mlm_fields, _mlm_make),
    Generator("two_moons", {"n": 2000, "rotation": 30.0, "noise": 0.1}, _tm_fields, _tm_make),
    Generator("flow_pairs", {"n": 2048, "height": 16, "width": 16, "channels": 3, "max_flow": 2.0}, _fp_fields,
              _fp_make, zero_ok=("max_flow",)),
    Generator("digits", {"n": 1797, "rotations": False}, _dg_fields, _dg_make),
    Generator("digit_patches", {"n": 1797, "patch": 2, "mask_ratio": 0.75}, _dp_fields, _dp_make,
              zero_ok=("mask_ratio",)),
    Generator("statsmodels", {"n": 100000, "name": "sunspots", "lookback": 48, "horizon": 12}, _sm_fields,
              _sm_make, ordered=True, gap=_window_gap, choices={"name": tuple(STATSMODELS)}),
]}


def generate(gen: Generator, args: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """The generator's fields for bound `args`, from `seed`; at most `n` samples."""
    arrays = gen.make(args, np.random.default_rng(seed))
    n = min(args["n"], min(len(v) for v in arrays.values()))
    return {k: v[:n] for k, v in arrays.items()}
