"""The torch.optim optimizers a recipe may name, with their arguments, known without importing torch.

`specc check` checks a recipe's optimizer against this table, so that checking a spec never waits
for torch to load; `specc train` builds the optimizer from torch.optim itself (an argument this
table lists but the installed torch lacks is then a located error), and a test keeps the table
equal to torch.optim's. LBFGS is left out: its step needs a closure that re-evaluates the loss.
"""

from __future__ import annotations

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
