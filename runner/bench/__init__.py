"""``llama-runner bench``: the load generator (``harness``) and its statistics
and report formats (``stats``).
"""
