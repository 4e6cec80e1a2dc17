"""llama-runner: a llama.cpp runner process (Cython binding + engine + protocol)."""

from runner.buildinfo import check_single_distribution as _check_single_distribution

__version__ = "0.1.0"

# Each wheel variant (llama-runner, llama-runner-cuda12, ...) installs this
# same package; two of them in one environment is an error, said here once.
_check_single_distribution()
