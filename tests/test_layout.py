"""The package's parts load apart.  A parent server that only spawns and
drives runners imports the client side of runner.process (and reads GGUF
headers and estimates with runner.model) without loading the binding:
libllama, ggml and whatever GPU backends a wheel carries."""

import subprocess
import sys

CLIENT_SIDE = ["runner.process.client", "runner.process.pool", "runner.process.protocol",
               "runner.process.security", "runner.model.gguf", "runner.model.memory",
               "runner.engine.requests", "runner.engine.limits"]


def test_the_client_side_loads_without_the_binding():
    code = f"import sys; import {', '.join(CLIENT_SIDE)}; print(sorted(m for m in sys.modules if m == 'runner._llama'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_engine_loads_the_binding():
    # the check above would pass for any module list if nothing ever loaded it
    code = "import sys, runner.engine.core; print('runner._llama' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
