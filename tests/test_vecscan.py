"""ext/vecscan.cpp: every implementation of the argmax, of the block maxima
and of the native chain's top-k scan gives the same answers.

The process picks one implementation, the widest the CPU has, so each
narrower one runs in a child process with LLAMA_RUNNER_VECSCAN set.  The
argmax is checked against numpy; the native chain's draws (which go through
the top-k scan: the block skip and, from top_k 16, the mask of a block's
entries that reach the floor) must be identical whichever implementation
scanned."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

# Arrays with every layout the scans treat apart: lengths around the
# 16-float and 256-float blocks, ties, NaN (also in the first lane of a
# block and at index 0), -inf everywhere but one entry, +inf in the tail.
ARRAYS = r"""
import numpy as np

def arrays():
    rng = np.random.default_rng(7)
    for n in (1, 2, 15, 16, 17, 255, 256, 257, 511, 4096, 49152, 49153):
        for trial in range(12):
            x = rng.standard_normal(n).astype(np.float32)
            where = rng.integers(0, n, size=3)
            if trial % 6 == 1:
                x[where] = x.max() + 1
            elif trial % 6 == 2:
                x[where] = np.nan
            elif trial % 6 == 3:
                x[:] = np.float32(-np.inf)
                x[where[0]] = 0.0
            elif trial % 6 == 4:
                x[::16] = np.nan
            elif trial % 6 == 5:
                x[0] = np.nan
            yield x
    y = np.zeros(1000, np.float32)
    y[999] = np.inf
    yield y
"""

# The child computes with ARRAYS' arrays; the parent computes numpy's answers
# from the same ARRAYS.
PROBE = ARRAYS + r"""
import json
from runner import _llama

out = {"isa": _llama.vecscan_isa(), "argmax": [], "maxima": [], "draws": []}
for x in arrays():
    out["argmax"].append(_llama.argmax(x))
    out["maxima"].append([float(v) for v in _llama.block_maxima(x)])
    for top_k, temp in ((1, 1.0), (5, 0.8), (40, 0.8), (1024, 1.5), (40, 0.0)):
        if x.shape[0] > 1:
            out["draws"].append(_llama.fast_sample_once(x, temperature=temp, top_k=top_k,
                                                        top_p=0.95, seed=11))
print(json.dumps(out))
"""


def run_probe(isa: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LLAMA_RUNNER_VECSCAN", None)
    if isa is not None:
        env["LLAMA_RUNNER_VECSCAN"] = isa
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reference_argmax(x: np.ndarray) -> int:
    if np.isnan(x[0]) or np.all(np.isnan(x)):
        return 0
    return int(np.nanargmax(x))


def reference_block_max(block: np.ndarray) -> float:
    numbers = block[~np.isnan(block)]
    return float(numbers.max()) if numbers.size else float("-inf")


def narrower_isas() -> list[str]:
    return ["scalar", "sse2"] if platform.machine() in ("x86_64", "AMD64") else ["scalar"]


def test_every_implementation_agrees(llama):
    best = run_probe(None)
    assert best["isa"] == llama.vecscan_isa()
    # The expected argmax, from numpy, over the same arrays.
    namespace: dict = {}
    exec(ARRAYS, namespace)
    expected = [reference_argmax(x) for x in namespace["arrays"]()]
    maxima = [[reference_block_max(b) for b in x[:len(x) // 64 * 64].reshape(-1, 64)]
              for x in namespace["arrays"]()]
    assert best["argmax"] == expected
    assert best["maxima"] == maxima
    for isa in narrower_isas():
        other = run_probe(isa)
        assert other["isa"] == isa
        assert other["argmax"] == expected, isa
        assert other["maxima"] == maxima, isa
        assert other["draws"] == best["draws"], isa


def test_an_unknown_choice_falls_back_to_the_best(llama):
    assert run_probe("no-such-unit")["isa"] == llama.vecscan_isa()
