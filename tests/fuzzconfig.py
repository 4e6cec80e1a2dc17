"""How many examples the property and fuzz suites try.

The suites run in every test run with bounded counts; ``RUNNER_FUZZ_SCALE``
multiplies them (``RUNNER_FUZZ_SCALE=20 pytest tests/test_protocol_fuzz.py``
for a long run).  docs/reliability.md lists the suites and their counts.
"""

from __future__ import annotations

import os


def scale() -> float:
    """The multiplier from ``RUNNER_FUZZ_SCALE`` (1 when unset)."""
    value = os.environ.get("RUNNER_FUZZ_SCALE", "").strip()
    if not value:
        return 1.0
    factor = float(value)
    if not factor > 0:
        raise ValueError(f"RUNNER_FUZZ_SCALE must be a positive number, got {value!r}")
    return factor


def examples(count: int) -> int:
    """``count`` examples, scaled (at least one)."""
    return max(1, round(count * scale()))
