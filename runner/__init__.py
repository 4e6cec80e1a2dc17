"""llama-runner: a llama.cpp runner process (Cython binding + engine + protocol)."""

__version__ = "0.1.0"
