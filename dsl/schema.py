"""The YAML layer of a spec: pydantic models, validated with located errors.

`read_spec(text, file)` composes the YAML safely (yamlpos), validates it against `SpecFile`, and
maps every pydantic error back to the line and column of the offending key or value.
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from .diagnostics import Collector, Diagnostic, SpecError, did_you_mean
from .yamlpos import Located, load_yaml

IDENT = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
#: A Python module name as `imports:` takes it: dotted identifiers, e.g. my_ops or lab.ops.
MODULE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
#: A `freeze:` pattern: parameter-path characters and the glob wildcards * ? [ ] !.
FREEZE_PATTERN = re.compile(r"\A[A-Za-z0-9_.*?\[\]!-]+\Z")
#: The largest integers a spec may hold (far beyond any size, yet cheap to compute and print).
MAX_INT_BITS = 1024
#: Names a spec may not define: they would shadow the language's own words.
RESERVED = frozenset({"true", "false", "none", "range", "repeat", "return", "self"})


def check_identifier(name: str) -> str:
    """`name` if it can name something in a spec (and so in generated code), else ValueError."""
    if not isinstance(name, str) or not IDENT.fullmatch(name):
        raise ValueError(f"{_quoted(name)} is not a valid name (letters, digits and '_', not starting with a digit)")
    if keyword.iskeyword(name) or name in RESERVED:
        raise ValueError(f"'{name}' is a reserved word and cannot be used as a name")
    if name.startswith("__"):
        raise ValueError(f"'{name}' starts with '__', which Python reserves; choose another name")
    return name


def check_module_name(name: str) -> str:
    """`name` if it is a dotted Python module name (each part an identifier, not a keyword), else ValueError."""
    if not isinstance(name, str) or not MODULE.fullmatch(name) or \
            any(keyword.iskeyword(part) or "__" in part for part in name.split(".")):
        raise ValueError(f"{_quoted(name)} is not a module name (dotted identifiers without '__', e.g. my_ops "
                         f"or lab.ops)")
    return name


def _quoted(name: object) -> str:
    """A name for a message: quoted as written, or repr'd when it holds unprintable characters."""
    text = str(name)
    return f"'{text}'" if text.isprintable() else repr(text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DimDecl(_Strict):
    """A symbolic dimension: the example value used by `check`/`example_inputs`, and its bounds."""

    example: int = Field(gt=0, description="The size used by `specc check` and example_inputs().")
    min: int = Field(default=1, gt=0, description="The smallest size the model accepts.")
    max: Union[int, str, None] = Field(default=None, description="The largest size: an integer or an expression "
                                                                 "over params, e.g. block_size.")


class OutputDecl(_Strict):
    """An output with options: its type, and whether only training needs it."""

    type: str | None = Field(default=None, description="The declared type, e.g. f32[B, 10] (null: inferred).")
    training_only: StrictBool = Field(default=False, description="Needed only in training (an auxiliary head or "
                                                           "loss input): dropped, with everything only it "
                                                           "needs, from deploy builds (specc build --deploy).")


ParamValue = Union[bool, int, float, str]


def _check_pattern(pattern: str) -> str:
    if not FREEZE_PATTERN.fullmatch(pattern):
        raise ValueError(f"{_quoted(pattern)} is not a parameter-path pattern (names, '.', and the wildcards "
                         f"* ? [...])")
    return pattern


ModuleName = Annotated[str, AfterValidator(check_module_name)]
FreezePattern = Annotated[str, AfterValidator(_check_pattern)]


class FieldDecl(_Strict):
    """A field of a data file: its type over the sample axis N, and for a .csv file its columns."""

    type: str = Field(description="The field's type with the sample axis first, e.g. f32[N, 8] or i64[N] "
                                  "in range(10).")
    columns: list[str] | None = Field(default=None, description="CSV only: the columns that make up the field "
                                                                "(default: the column named like the field).")


class DataFile(_Strict):
    """The user's own data: a .npz or .csv file (relative to the spec file) with declared fields."""

    file: str = Field(description="Path of a .npz or .csv file, relative to the spec file.")
    fields: dict[str, Union[str, FieldDecl]] = Field(
        description="The fields to read: name -> type (e.g. x: f32[N, 8]), or {type: ..., columns: [...]}.")
    ordered: StrictBool = Field(default=False, description="Samples are in time order: validate on the last ones, "
                                                     "without shuffling the split.")


class EvalDecl(_Strict):
    """Evaluation on the validation split."""

    every: int = Field(gt=0, description="Evaluate every N steps (and after the last step).")
    metrics: dict[str, str] = Field(default_factory=dict,
                                    description="Named metric expressions over outputs and data fields, e.g. "
                                                "acc: accuracy(logits, label).")


class CheckpointDecl(_Strict):
    """Checkpoints: weights (safetensors) and optimizer, schedule and RNG state."""

    every: int = Field(gt=0, description="Write a checkpoint every N steps (and after the last step).")
    keep: int = Field(default=2, gt=0, description="How many of the newest checkpoints to keep.")


class LoraDecl(_Strict):
    """Parameter-efficient fine-tuning: freeze the model, add a low-rank update to named linear layers."""

    layers: list[FreezePattern] = Field(description="Glob patterns over linear layers' paths (parameter paths "
                                                    "without '.weight'), e.g. 'h.*.attention.q'.")
    rank: int = Field(default=4, gt=0, description="The rank r of the update B @ A.")
    alpha: float | None = Field(default=None, gt=0.0, description="The update is scaled by alpha / r (default: "
                                                                   "alpha = r).")


class AdaptersDecl(_Strict):
    """Parameter-efficient fine-tuning: freeze the model, add a trained bottleneck adapter to named layers."""

    layers: list[FreezePattern] = Field(description="Glob patterns over layers' paths (linear, attention and mlp "
                                                    "layers, as `specc ir -O0` names them), e.g. 'h.*.attention'.")
    bottleneck: int = Field(default=16, gt=0, description="The adapter's width: down [bottleneck, d], up "
                                                          "[d, bottleneck] (up starts at zero).")
    kind: Literal["houlsby", "parallel"] = Field(
        default="houlsby", description="houlsby: h + up(relu(down(h))) after the layer's output h; parallel: the "
                                       "layer's output + scale * up(relu(down(x))) beside it, reading its input x.")
    scale: float | None = Field(default=None, gt=0.0, description="Factor of the adapter's output (default: 1 for "
                                                                  "houlsby, 4 for parallel).")


class PrefixDecl(_Strict):
    """Prefix tuning: freeze the model, give named attention layers l trained key and value rows."""

    layers: list[FreezePattern] = Field(description="Glob patterns over attention layers' paths, e.g. "
                                                    "'h.*.attention'.")
    length: int = Field(default=8, gt=0, description="l: the key rows and value rows of each prefix.")


class GroupDecl(BaseModel):
    """Optimizer settings for the parameters matching `params` (other keys: optimizer arguments)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    params: Union[FreezePattern, list[FreezePattern]] = Field(
        description="Glob pattern(s) over parameter paths; the other keys override optimizer arguments for them, "
                    "e.g. {params: '*.bias', weight_decay: 0}.")
    clip: float | None = Field(default=None, gt=0.0, description="Clip the norm of this group's gradient alone to "
                                                                 "this value (its parameters leave train.clip's).")


class TrainSection(_Strict):
    """The training recipe: data, loss, optimizer and schedule, run by `specc train`."""

    data: Union[str, DataFile] = Field(
        description="A built-in data set as a call, e.g. arithmetic(digits=3, format=\"reversed\"), or "
                    "{file: ..., fields: {...}} for a .npz / .csv file.")
    split: float = Field(default=0.1, ge=0.0, lt=1.0, description="Fraction of the samples held out for validation.")
    seed: StrictInt = Field(default=0, ge=0, le=2 ** 63 - 1,
                            description="Seed of the data, the split, the batch order and dropout.")
    feed: dict[str, str] = Field(default_factory=dict,
                                 description="Model input -> data field, for inputs not named like a field.")
    loss: str = Field(description="The loss: an expression over outputs, data fields and scalars, e.g. "
                                  "cross_entropy(logits, targets, mask=mask) + 0.1 * l1(y, target).")
    optimizer: str = Field(default="adamw(lr=0.001)", description="A torch.optim optimizer by name with its "
                                                                  "arguments, e.g. sgd(lr=0.1, momentum=0.9).")
    schedule: str | None = Field(default=None, description="Learning-rate factor per step, e.g. "
                                                           "warmup_cosine(warmup=100), or an expression over "
                                                           "step and progress.")
    scalars: dict[str, str] = Field(default_factory=dict,
                                    description="Named scalars scheduled over step and progress (0 to 1), usable in "
                                                "the loss and fed to scalar inputs, e.g. "
                                                "lam: 2 / (1 + exp(-10 * progress)) - 1.")
    random: dict[str, str] = Field(default_factory=dict,
                                   description="Model input -> a random draw made afresh each step, e.g. keep: "
                                               "subset(ratio=0.25), noise: normal(0, 0.1): subset(k | ratio), "
                                               "bernoulli(p), uniform(lo, hi), normal(mean, std). A drawn input "
                                               "takes no data field; in the loss its name means the draw.")
    clip: float | None = Field(default=None, gt=0.0, description="Clip the gradient norm to this value (of the "
                                                                 "parameters in no group with a clip of its own).")
    groups: list[GroupDecl] = Field(default_factory=list, description="Per-group optimizer settings, and clip: N "
                                                                      "to clip a group's gradient norm alone.")
    freeze: list[FreezePattern] = Field(default_factory=list,
                                        description="Parameters not trained (glob patterns over parameter paths).")
    steps: int | None = Field(default=None, gt=0, description="Optimizer steps (or give epochs).")
    epochs: int | None = Field(default=None, gt=0, description="Passes over the training split (or give steps).")
    batch: int = Field(default=32, gt=0, description="Samples per step (the global batch).")
    eval: EvalDecl | None = Field(default=None, description="Evaluation every N steps with named metrics.")
    checkpoint: CheckpointDecl | None = Field(default=None, description="Checkpoints every N steps.")
    lora: LoraDecl | None = Field(default=None, description="Fine-tune with LoRA: every parameter of the model is "
                                                            "frozen, the named linear layers get a trained update "
                                                            "alpha / r * B @ A, merged into their weights in RUN/model.")
    adapters: AdaptersDecl | None = Field(default=None, description="Fine-tune with adapters: every parameter of "
                                                                    "the model is frozen, the named layers get a "
                                                                    "trained bottleneck adapter, kept in RUN/model.")
    prefix: PrefixDecl | None = Field(default=None, description="Fine-tune with prefixes: every parameter of the "
                                                                "model is frozen, the named attention layers get l "
                                                                "trained key and value rows, kept in RUN/model.")


class TrainOnly(_Strict):
    """The `train:` section alone, to validate it again after `--set train.KEY=VALUE` overrides."""

    train: TrainSection


class SpecFile(_Strict):
    specc: Literal[1] = Field(description="Spec format version; always 1.")
    name: str = Field(description="Name of the model; becomes the generated module's name.")
    paper: str | None = Field(default=None, description="The paper this architecture comes from.")
    description: str | None = Field(default=None, description="Free text; lands in the generated module's "
                                                              "docstring.")
    params: dict[str, ParamValue] = Field(default_factory=dict,
                                          description="Named parameters with defaults; override with --set k=v.")
    derived: dict[str, str] = Field(
        default_factory=dict,
        description="Params computed from other params: name -> an expression over params and the derived "
                    "params above it (arithmetic, comparisons, a if c else b, min, max, int, float, sqrt), e.g. "
                    "{d_ff: 4 * d_model, head_dim: d_model // heads, vocab: alphabet + 3}. Evaluated in order "
                    "after --set overrides and scale presets; a derived param cannot be set itself.",
        json_schema_extra={"examples": [{"d_ff": "4 * d_model", "head_dim": "d_model // heads"}]})
    dims: dict[str, Union[int, DimDecl]] = Field(default_factory=dict,
                                                 description="Symbolic dimensions: example value and bounds.")
    inputs: dict[str, str] = Field(description="Typed inputs, e.g. x: f32[B, T, d] or ids: i64[B, T] in range(vocab).")
    blocks: dict[str, str] = Field(default_factory=dict,
                                   description="Reusable blocks: 'name(arg, kw=default)': body.")
    graph: str = Field(description="The graph body: one statement per line.")
    outputs: dict[str, Union[str, None, OutputDecl]] = Field(
        description="Declared outputs: a type (or null to infer), or {type: ..., training_only: true}.")
    seed: StrictInt = Field(default=0, ge=0, le=2 ** 63 - 1, description="Seed for weight initialisation.")
    freeze: list[FreezePattern] = Field(
        default_factory=list,
        description="Glob patterns over parameter paths (as `specc ir` prints them, e.g. 'backbone.*' or "
                    "'h.*.attention.*'): every matching parameter is frozen (requires_grad off in the built "
                    "module). A pattern that matches no parameter is an error.")
    scales: dict[str, dict[str, ParamValue]] = Field(
        default_factory=dict,
        description="Scaling presets: preset name -> parameter overrides, e.g. {n: {depth: 1, width: 16}}. "
                    "The param 'scale' selects one (params.scale, or --set scale=n); --set of a single "
                    "param still wins over the preset.")
    imports: list[ModuleName] = Field(
        default_factory=list,
        description="Python modules defining custom operators (specc.custom_op), e.g. [my_ops]. Imported "
                    "only when the user allows each one (specc --allow-import my_ops, or "
                    "specc.load(..., allow_imports=['my_ops'])); the built model.py imports them too.")
    train: TrainSection | None = Field(default=None, description="The training recipe (specc train).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_identifier(v)

    @field_validator("inputs", "outputs")
    @classmethod
    def _nonempty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one entry is required")
        return v


@dataclass(frozen=True)
class SpecSource:
    """A validated spec file with the positions of all its parts.

    `pending` holds errors of the YAML layer that did not stop reading: the entries at fault were
    left out of `spec` (their names are in `unknown`), so that elaboration can still report the
    independent errors of the rest, and must then raise these too."""

    spec: SpecFile
    doc: Located
    pending: tuple[Diagnostic, ...] = ()
    unknown: frozenset[tuple[str, str]] = frozenset()  # (section, name) of the entries left out

    @property
    def file(self) -> str:
        return self.doc.file

    @property
    def text(self) -> str:
        return self.doc.text


_YAML11_BOOLS = {"y", "yes", "n", "no", "on", "off"}  # booleans in YAML 1.1, text in YAML 1.2


def _message(err: dict[str, Any], data: Any) -> tuple[str, bool]:
    """Readable message for one pydantic error; second item: whether it points at a key."""
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        parent = _at(data, loc[:-1])
        allowed: list[str] = []
        if len(loc) == 1:
            allowed = list(SpecFile.model_fields)
        elif isinstance(parent, dict) and len(loc) == 3 and loc[0] == "dims":
            allowed = list(DimDecl.model_fields)
        elif loc[0] == "train":
            allowed = list(_train_model_at(loc[1:-1]).model_fields)
        where = "" if len(loc) == 1 else f" in '{'.'.join(map(str, loc[:-1]))}'"
        return f"unknown key '{loc[-1]}'{where}" + did_you_mean(str(loc[-1]), allowed), True
    if kind == "missing":
        return f"missing required key '{loc[-1]}'", False
    if kind == "literal_error" and loc == ("specc",):
        return "unsupported spec version: 'specc' must be 1", False
    if kind == "string_type" and len(loc) == 2 and loc[0] == "derived":
        return (f"derived.{loc[1]}: expected an expression over params, e.g. 4 * d_model, got "
                f"{_yaml_kind(_at(data, loc))} (a fixed value belongs under 'params:')"), False
    if kind in _EXPECTED:
        return _expected(loc, [_EXPECTED[kind]], _at(data, loc)), False
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = next(iter((err.get("ctx") or {}).values()), "?")
        words = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than",
                 "less_than_equal": "at most"}[kind]
        return f"{'.'.join(map(str, loc))}: must be {words} {bound}, got {_at(data, loc)!r}", False
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    field = ".".join(str(p) for p in loc)
    return f"{field}: {msg}", False


def _train_model_at(path: tuple) -> type[BaseModel]:
    """The model of the `train:` section that holds the key at `path` (inside train)."""
    nested = {("eval",): EvalDecl, ("checkpoint",): CheckpointDecl, ("data",): DataFile, ("lora",): LoraDecl}
    if len(path) == 3 and path[0] == "data" and path[1] == "fields":
        return FieldDecl
    return nested.get(tuple(path[:1]), TrainSection)


def _at(data: Any, path: tuple) -> Any:
    for p in path:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _real_loc(err: dict[str, Any], data: Any) -> tuple[tuple, bool]:
    """The error's path through the data, and whether pydantic added union-branch labels to it."""
    real: list = []
    labelled = False
    cur = data
    loc = tuple(err["loc"])
    for i, p in enumerate(loc):
        if isinstance(cur, dict) and p in cur:
            real.append(p)
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            real.append(p)
            cur = cur[p]
        elif i == len(loc) - 1 and err["type"] == "missing":
            real.append(p)
        else:
            labelled = True
    return tuple(real), labelled


_EXPECTED = {"bool_type": "a boolean", "bool_parsing": "a boolean", "int_type": "an integer",
             "int_parsing": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "float_parsing": "a number", "string_type": "a string", "dict_type": "a mapping",
             "model_type": "a mapping", "list_type": "a list"}


def _yaml_kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string", type(None): "nothing"}.get(type(value), type(value).__name__)


def _located_errors(e: ValidationError, doc: Located) -> Collector:
    errors = Collector()
    entries = [(err, *_real_loc(err, doc.data)) for err in e.errors()]
    deep = {loc for _, loc, _ in entries}
    unions: dict[tuple, list[str]] = {}
    for err, loc, labelled in entries:
        if labelled and any(len(o) > len(loc) and o[:len(loc)] == loc for o in deep):
            continue  # a more specific error inside one union branch says more
        if labelled and err["type"] in _EXPECTED:
            unions.setdefault(loc, []).append(_EXPECTED[err["type"]])
            continue
        err = dict(err, loc=loc)
        msg, at_key = _message(err, doc.data)
        span = doc.key_span(loc) if at_key else (doc.span(loc[:-1]) if err["type"] == "missing" else doc.span(loc))
        errors.error(span, msg)
    for loc, kinds in unions.items():
        errors.error(doc.span(loc), _expected(loc, kinds, _at(doc.data, loc)))
    return errors


def _expected(loc: tuple, kinds: list[str], value: Any) -> str:
    why = ""
    if "a boolean" in kinds and isinstance(value, str) and value.lower() in _YAML11_BOOLS:
        why = f" ('{value}': spec files are YAML 1.2, whose booleans are true and false)"
    return f"{'.'.join(map(str, loc))}: expected {' or '.join(dict.fromkeys(kinds))}, got {_yaml_kind(value)}{why}"


#: Sections whose keys name things (and so become identifiers in generated code).
NAMED_SECTIONS = ("params", "derived", "dims", "inputs", "outputs")


def _check_names(doc: Located, errors: Collector) -> set[tuple]:
    """Every key that names something is a valid, unreserved identifier; parameter values are
    finite. Checked apart from pydantic, so each bad key is reported at the key itself and also
    when other entries of the same section have errors. Returns the paths of the bad entries."""
    bad: set[tuple] = set()
    for section in NAMED_SECTIONS:
        entries = doc.data.get(section)
        if not isinstance(entries, dict):
            continue
        for key, value in entries.items():
            try:
                check_identifier(key)
            except ValueError as e:
                errors.error(doc.key_span((section, key)), f"{section}: {e}")
                bad.add((section, key))
            if section == "params" and isinstance(value, float) and not math.isfinite(value):
                errors.error(doc.span((section, key)), f"params.{key}: expected a finite number, got {value}")
                bad.add((section, key))
            if section == "params" and isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
                errors.error(doc.span((section, key)), f"params.{key}: the integer is too large "
                                                       f"(more than {MAX_INT_BITS} bits)")
                bad.add((section, key))
    return bad


#: Stand-ins for top-level values in error, so that the rest of a spec can still be checked.
_STAND_INS = {"specc": 1, "name": "model", "seed": 0}
_ENTRY_SECTIONS = ("params", "derived", "dims", "inputs", "outputs", "blocks")


def _salvage(data: dict, bad: set[tuple]) -> tuple[SpecFile | None, frozenset[tuple[str, str]]]:
    """The spec without the entries at `bad` paths, and the names of the entries left out; None
    when what remains is not a spec (e.g. the graph is missing)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    unknown: set[tuple[str, str]] = set()
    for path in bad:
        if not path:
            return None, frozenset()
        key = path[0]
        if len(path) == 1 and key in _STAND_INS:
            data[key] = _STAND_INS[key]
        elif key in ("paper", "description", "train") or (len(path) == 1 and key not in SpecFile.model_fields):
            data.pop(key, None)  # free text, the training recipe, or an unknown top-level key
        elif len(path) >= 2 and key in _ENTRY_SECTIONS and isinstance(data.get(key), dict):
            data[key].pop(path[1], None)
            if key == "blocks":  # a block's key is its signature: the name comes first
                name = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", str(path[1]))
                if name:
                    unknown.add((key, name.group(1)))
            elif IDENT.fullmatch(str(path[1])):
                unknown.add((key, str(path[1])))
        else:
            return None, frozenset()
    try:
        return SpecFile.model_validate(data), frozenset(unknown)
    except ValidationError:
        return None, frozenset()


def read_spec(text: str, file: str) -> SpecSource:
    """Parse and validate a spec file's YAML layer. Raises SpecError with every problem found,
    unless the rest of the spec can still be checked: then the SpecSource carries the problems in
    `pending` (and `elaborate` raises them, with any errors of the rest)."""
    doc = load_yaml(text, file)
    if not isinstance(doc.data, dict):
        raise _not_mapping(doc)
    errors = Collector()
    bad = _check_names(doc, errors)
    try:
        spec: SpecFile | None = SpecFile.model_validate(doc.data)
    except ValidationError as e:
        errors.extend(_located_errors(e, doc).diagnostics)
        bad |= {_real_loc(err, doc.data)[0] for err in e.errors()}
        spec = None
    if not errors:
        return SpecSource(spec, doc)
    spec, unknown = _salvage(doc.data, bad)
    if spec is None:
        errors.raise_if_any({file: text})
    return SpecSource(spec, doc, tuple(sorted(errors.diagnostics, key=lambda d: (d.span.line, d.span.col))),
                      unknown)


def _not_mapping(doc: Located) -> SpecError:
    return SpecError(Diagnostic(doc.span(()), "a spec file must be a YAML mapping (key: value lines)"),
                     {doc.file: doc.text})


def json_schema() -> dict:
    """JSON Schema of the spec format, for editors with a YAML language server."""
    schema = SpecFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "specc spec file"
    return schema
