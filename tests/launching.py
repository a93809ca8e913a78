"""How the tests start ``accelerate launch`` on CPU processes.

``accelerate launch --cpu --num_processes 2`` starts *one* process (accelerate's CPU path is the simple
launcher, which runs several only through ``mpirun``) — silently. Several CPU processes take the torchrun
launcher (``--multi_gpu``) with ``ACCELERATE_USE_CPU=1`` in the environment (without it each process finds
no GPU and runs alone as process 0 of 1), on a free port so that concurrent tests do not collide.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(args: list[str], processes: int, env: dict[str, str],
                       config_file: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) running ``args`` (a script or ``-m module`` and its arguments) on
    ``processes`` CPU processes under ``accelerate launch``."""
    env = dict(env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    elif processes > 1:
        cmd += ["--multi_gpu"]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--main_process_port", str(free_port())]
    else:
        cmd += ["--cpu"]
    cmd += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", *args]
    return cmd, env


def default_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
