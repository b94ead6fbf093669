"""`specc train --nproc N`: the same recipe on N processes with torch.distributed.

`launch` starts torchrun's launcher (`python -m torch.distributed.run --standalone`) with N
workers, each running `specc train` again; a worker finds torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) and `process_group` joins the group: gloo on CPU, nccl when
the worker has a GPU. Every worker computes the same step's global batch order and takes its
share (the global batch divided by the number of workers); DistributedDataParallel averages the
gradients, so a step equals one step on the whole batch (for a loss that is a mean over samples).
Rank 0 alone writes metrics, checkpoints and the built model. On several machines, run torchrun
yourself on each (see the README's "Training" section).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import subprocess
import sys
from typing import Iterator, Sequence

from .loop import Dist


def check_launch(recipe, nproc: int) -> None:
    """Raise the user errors a worker would meet, before any worker starts: a global batch that does
    not divide among the processes, a bad data file."""
    from specc.dsl.diagnostics import Diagnostic, SpecError

    if recipe.section.batch % nproc:
        raise SpecError(Diagnostic(recipe.span, f"train: the batch ({recipe.section.batch}) must divide among "
                                                f"{nproc} processes"), recipe.sources)
    if recipe.data_file is not None:
        from .files import load

        load(recipe)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `specc ARGV` on `nproc` local processes through torchrun; its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "specc.cli", *argv]
    return subprocess.call(cmd)


@contextlib.contextmanager
def process_group() -> Iterator[Dist]:
    """This process's Dist: a joined process group under torchrun, else a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    import torch
    import torch.distributed as tdist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    for name in _WORLD_DEFAULTS:  # before the group exists, so that their defaults hold none
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    tdist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield Dist(rank, world, f"cuda:{local}" if use_cuda else "cpu")
        tdist.barrier()  # every rank done with its collectives before any tears the group down
    finally:
        gc.collect()  # a DistributedDataParallel model left in a reference cycle holds the group too
        tdist.destroy_process_group()  # frees the group: its worker threads end here, not at interpreter exit


#: torch modules with functions whose default argument is `group=group.WORLD`, evaluated at import. Imported
#: after init_process_group (DistributedDataParallel imports torch.distributed.nn.functional through
#: torch._dynamo), they keep the default group alive for good, so destroy_process_group does not free it and
#: gloo's worker threads run on into interpreter shutdown. A worker that drops a finished collective's work
#: there (the last all_reduce of a Python tensor, kept until the barrier's work goes) needs the GIL to release
#: the tensor's Python object; at shutdown CPython ends the thread instead, inside a noexcept destructor, and
#: the process aborts: "terminate called without an active exception" (some runs of `specc train --nproc 2`).
#: (torch.distributed.optim.zero_redundancy_optimizer and fsdp.sharded_grad_scaler do the same; a run imports
#: neither.)
_WORLD_DEFAULTS = ("torch.distributed.nn.functional",)
