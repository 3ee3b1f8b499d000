"""A real dask cluster as users start one: `dask scheduler` and `dask worker` (with its nanny) as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def real_cluster(folder: Path, workers: int = 1, timeout: float = 120.0, gpu: bool = True) -> Iterator[str]:
    """Start a scheduler on a free loopback port and `workers` worker processes (each `--nworkers 1
    --nthreads 1`, with `--resources GPU=1` when `gpu`, under its nanny, so tasks run in daemonic
    processes); yield its address."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}
    logs = [open(folder / f"{name}.log", "w") for name in ["scheduler", *(f"worker{i}" for i in range(workers))]]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file)], stdout=logs[0], stderr=subprocess.STDOUT, env=env, cwd=folder,
    )]
    try:
        deadline = time.monotonic() + timeout
        while (address := _scheduler_address(scheduler_file)) is None:
            if time.monotonic() > deadline or processes[0].poll() is not None:
                raise RuntimeError(f"the scheduler did not start: {(folder / 'scheduler.log').read_text()}")
            time.sleep(0.2)
        for index in range(workers):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", address, "--nworkers", "1", "--nthreads", "1",
                 *(["--resources", "GPU=1"] if gpu else []), "--no-dashboard", "--host", "127.0.0.1",
                 "--name", f"w{index}"],
                stdout=logs[index + 1], stderr=subprocess.STDOUT, env=env, cwd=folder,
            ))
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(workers, timeout=timeout)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


def _scheduler_address(scheduler_file: Path) -> str | None:
    """The address in the scheduler's file, None until the scheduler has written it whole."""
    try:
        return json.loads(scheduler_file.read_text())["address"]
    except (FileNotFoundError, ValueError, KeyError):
        return None
