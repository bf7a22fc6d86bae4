"""`sftkit train --nproc_per_node N`: data-parallel training in N processes on this machine, without torchrun.

torchrun and `accelerate launch` start every process afresh, and each imports torch, transformers and
datasets on its own: about 300 MiB of private memory per process before it reads any data. Here the
libraries are imported once, then torch's elastic agent (the one torchrun runs: rendezvous, monitoring, one
failed process stops the others) forks the N processes from this one. The processes share the imported
pages until one writes to them; `gc.freeze()` keeps the garbage collector from writing to every imported
object. The data are shared as under any launcher: tokenized once by the main
process, read memory-mapped by all.

Nothing here touches a GPU: CUDA cannot be used in a process forked after it was initialised, so the
processes select and initialise their devices themselves, as under torchrun.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable

from sftkit.config import ConfigError, SFTConfig
from sftkit.train.errors import TrainingError
from sftkit.train.interrupt import was_requested


def launch(config: SFTConfig, nproc_per_node: int, train: Callable[[SFTConfig], None]) -> None:
    """Run `train(config)` in `nproc_per_node` forked processes (in this one when 1). `train` prints its own
    errors and exits with code 2; a process that stops stops the others, and the launch with a TrainingError
    that names it (with its traceback when it crashed)."""
    if nproc_per_node == 1:
        train(config)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "--nproc_per_node: this process was already started by a launcher (torchrun or "
            "accelerate launch); use one or the other"
        )
    # A CUDA check before the fork asks NVML, which leaves no CUDA state for the forked processes to trip on.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if torch.cuda.is_initialized():
        raise TrainingError(
            "--nproc_per_node: CUDA was initialised before the processes were forked, and a forked "
            "process cannot use it; launch with torchrun instead"
        )

    for shared in ("datasets", "transformers.modeling_utils", "sftkit.train.loop"):  # what every process imports
        importlib.import_module(shared)
    gc.freeze()
    # As `torchrun --standalone`: one node, a rendezvous on a free local port, no restarts.
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="fork",
    )
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)  # a failure is reported below, once
    try:
        elastic_launch(launch_config, entrypoint=_process)(train, config)
    except ChildFailedError as err:
        rank, failure = min(err.failures.items())
        crash = _traceback(failure.message) if failure.exitcode != 2 else ""
        raise TrainingError(
            f"training process {rank} stopped (exit code {failure.exitcode})"
            + (f":\n{crash}" if crash else "; its error is printed above")
        ) from None
    except SignalException as err:  # Ctrl-C or a kill: the agent passed it on to the processes, as torchrun does
        raise TrainingError(
            f"stopped by {err.sigval.name}; resume from the newest checkpoint with `--resume_from_checkpoint true`"
        ) from None
    finally:
        agent_log.setLevel(level)


def _process(train: Callable[[SFTConfig], None], config: SFTConfig) -> None:
    """One training process, as torchrun starts one: in a process group of its own, so that Ctrl-C reaches
    it once, passed on by the agent, not also from the terminal (a second interrupt would cut its interrupt
    checkpoint short); with Python's own signal handlers, not the agent's it was forked with. Interrupted,
    it exits once the run has saved and closed: the stopping agent no longer collects return values, which
    a forked process would otherwise wait for until it is killed."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    train(config)
    if was_requested():  # the loop stopped on Ctrl-C (interrupt.py) and saved
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT)


def _traceback(message: dict | str) -> str:
    """The crashed process's traceback, as the elastic agent recorded it."""
    if isinstance(message, dict):
        return message.get("extraInfo", {}).get("py_callstack") or str(message.get("message", ""))
    return message
