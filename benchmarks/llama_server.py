"""llama-server as a peer process for the benchmarks (built by scripts/build_peers.sh)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "build" / "peers" / "bin" / "llama-server"


class LlamaServer:
    """llama-server on a free loopback port, its output in a log file; ready
    (``/health`` answers) when the constructor returns, stopped by :meth:`close`.

    ``log_path`` keeps the log; without it a temporary file is used and removed.
    """

    def __init__(self, args: list[str], log_path: Path | None = None,
                 start_timeout: float = 120.0) -> None:
        if not SERVER.exists():
            raise SystemExit(f"{SERVER} is missing: run scripts/build_peers.sh first")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"       # base of the HTTP API
        self.cmd = [str(SERVER), *args, "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
        self._keep_log = log_path is not None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path                      # the server's stdout and stderr
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.close()
                raise RuntimeError(f"llama-server did not start ({shlex.join(self.cmd)}):\n{tail}")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as reply:
            return json.loads(reply.read())

    def post(self, path: str, body: dict):
        """POST ``body`` as JSON; returns the open response (a context manager)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=600)

    def stream_completion(self, body: dict):
        """POST a streamed ``/completion``; yields (perf_counter at arrival,
        event) for each server-sent event, the last one being the ``stop``
        event (with ``timings``)."""
        with self.post("/completion", {**body, "stream": True}) as reply:
            for line in reply:   # server-sent events: "data: {json}" lines
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                yield time.perf_counter(), event
                if event.get("stop"):
                    return

    def log_bytes(self, start: int = 0) -> bytes:
        """The log from byte ``start`` on."""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_bytes().decode("utf-8", "replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if not self._keep_log:
            self.log_path.unlink(missing_ok=True)
