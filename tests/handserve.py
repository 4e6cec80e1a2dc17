"""A runner started by hand, the way a parent without the client's spawn()
starts one: ``serve --defer-load`` on a private ipc endpoint."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys


@contextlib.contextmanager
def deferred_runner(model_path: str):
    """Yields ``(process, endpoint)`` once the runner printed its endpoint;
    kills it (if still running) and removes its ipc directory after."""
    from runner.process import security

    endpoint, directory = security.private_ipc_endpoint()
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "serve", "--model", str(model_path),
                             "--endpoint", endpoint, "--defer-load"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["endpoint", endpoint]
        yield proc, endpoint
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
