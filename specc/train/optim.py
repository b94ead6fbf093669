"""The torch.optim optimizers a recipe may name, with their arguments, known without importing torch.

`specc check` checks a recipe's optimizer against this table, so that checking a spec never waits
for torch to load; `specc train` builds the optimizer from torch.optim itself (an argument this
table lists but the installed torch lacks is then a located error), and a test keeps the table
equal to torch.optim's. LBFGS is left out: its step needs a closure that re-evaluates the loss.
`argument_problem` holds what `specc check` asks of an argument's value (flags true or false, numbers
finite and not booleans, lr at least 0), of the optimizer's arguments and of every `groups:` entry's
alike; the other ranges are left to torch's constructors when training starts, which check the
optimizer's own arguments only, so `loop.make_optimizer` passes each group's through them too.
"""

from __future__ import annotations

import math

#: lower-case name -> (torch.optim class name, argument names other than params)
OPTIMIZERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "adadelta": ("Adadelta", ('capturable', 'differentiable', 'eps', 'foreach', 'lr', 'maximize', 'rho',
                              'weight_decay')),
    "adafactor": ("Adafactor", ('beta2_decay', 'd', 'eps', 'foreach', 'lr', 'maximize', 'weight_decay')),
    "adagrad": ("Adagrad", ('differentiable', 'eps', 'foreach', 'fused', 'initial_accumulator_value', 'lr',
                            'lr_decay', 'maximize', 'weight_decay')),
    "adam": ("Adam", ('amsgrad', 'betas', 'capturable', 'decoupled_weight_decay', 'differentiable', 'eps',
                      'foreach', 'fused', 'lr', 'maximize', 'weight_decay')),
    "adamax": ("Adamax", ('betas', 'capturable', 'differentiable', 'eps', 'foreach', 'lr', 'maximize',
                          'weight_decay')),
    "adamw": ("AdamW", ('amsgrad', 'betas', 'capturable', 'differentiable', 'eps', 'foreach', 'fused', 'lr',
                        'maximize', 'weight_decay')),
    "asgd": ("ASGD", ('alpha', 'capturable', 'differentiable', 'foreach', 'lambd', 'lr', 'maximize', 't0',
                      'weight_decay')),
    "muon": ("Muon", ('adjust_lr_fn', 'eps', 'lr', 'momentum', 'nesterov', 'ns_coefficients', 'ns_steps',
                      'weight_decay')),
    "nadam": ("NAdam", ('betas', 'capturable', 'decoupled_weight_decay', 'differentiable', 'eps', 'foreach', 'lr',
                        'maximize', 'momentum_decay', 'weight_decay')),
    "radam": ("RAdam", ('betas', 'capturable', 'decoupled_weight_decay', 'differentiable', 'eps', 'foreach', 'lr',
                        'maximize', 'weight_decay')),
    "rmsprop": ("RMSprop", ('alpha', 'capturable', 'centered', 'differentiable', 'eps', 'foreach', 'lr',
                            'maximize', 'momentum', 'weight_decay')),
    "rprop": ("Rprop", ('capturable', 'differentiable', 'etas', 'foreach', 'lr', 'maximize', 'step_sizes')),
    "sgd": ("SGD", ('dampening', 'differentiable', 'foreach', 'fused', 'lr', 'maximize', 'momentum', 'nesterov',
                    'weight_decay')),
    "sparseadam": ("SparseAdam", ('betas', 'eps', 'lr', 'maximize')),
}
#: Optimizers of torch.optim that a recipe cannot use, and why.
UNSUPPORTED = {"lbfgs": "LBFGS needs a closure that re-evaluates the loss at every step"}

#: Arguments that switch a behaviour on or off: true or false (foreach and fused also none: torch decides).
FLAGS = frozenset({"amsgrad", "capturable", "centered", "decoupled_weight_decay", "differentiable", "foreach",
                   "fused", "maximize", "nesterov"})
#: Arguments that take one number (YAML's true is no number here, though torch would take it as 1).
NUMBERS = frozenset({"alpha", "beta2_decay", "d", "dampening", "eps", "initial_accumulator_value", "lambd", "lr",
                     "lr_decay", "momentum", "momentum_decay", "ns_steps", "rho", "t0", "weight_decay"})
#: Arguments that take a list of numbers.
LISTS = frozenset({"betas", "etas", "step_sizes", "ns_coefficients"})


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _show(v) -> str:
    return "true" if v is True else "false" if v is False else "none" if v is None else repr(v)


def argument_problem(name: str, value) -> str | None:
    """Why `value` cannot be the optimizer argument `name` (None: it may be), without torch: a flag takes
    true or false, a number a finite number that is not a boolean, a list numbers, and the learning rate
    is at least 0. The one check of the optimizer's own arguments and of each group's, so that a group
    cannot set what the optimizer may not (an lr of -1 would train by gradient ascent). The other ranges
    (betas in [0, 1), weight_decay at least 0, ...) are torch's constructors' to judge when training
    starts, for the optimizer and for each group alike (`loop.make_optimizer`)."""
    if name in FLAGS:
        if isinstance(value, bool) or (value is None and name in ("foreach", "fused")):
            return None
        return f"{name} must be true or false, got {_show(value)}"
    if name in NUMBERS:
        if name == "eps" and isinstance(value, (list, tuple)):
            return None  # Adafactor's eps is a pair, (none, 0.001) (torch checks it)
        if not _is_number(value):
            return f"{name} must be a finite number, got {_show(value)}"
        if name == "lr" and value < 0:
            return f"lr must be a number at least 0, got {value!r}"
        return None
    if name in LISTS and not (isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value)):
        return f"{name} must be a list of numbers, e.g. [0.9, 0.999], got {_show(value)}"
    return None
