"""Shared fixtures.

Tests that need the built extension and the default model are marked
``model`` (``pytest -m "not model"`` runs the policy-only part).  They fail,
not skip, when either is missing: ``scripts/dev.sh test`` provides both.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "model" in getattr(item, "fixturenames", ()) or "default_model_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def default_model_path():
    from runner.model.models import default_model_path as find

    return str(find())


@pytest.fixture(scope="session")
def llama():
    from runner import _llama

    _llama.backend_init()
    return _llama


@pytest.fixture(scope="session")
def model(llama, default_model_path):
    m = llama.Model(default_model_path)
    yield m
    m.close()


@pytest.fixture
def make_ctx(llama, model):
    """Factory for contexts that are closed after the test."""
    made = []

    def make(**kw):
        kw.setdefault("n_ctx", 1024)
        kw.setdefault("n_batch", 512)
        kw.setdefault("n_threads", 2)
        ctx = llama.Context(model, **kw)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


@pytest.fixture
def spawn(default_model_path):
    """Runner processes of the test's own, closed after it (a stopped one is
    resumed first: a SIGSTOPped runner cannot shut down)."""
    import os
    import signal

    from runner.process.client import Runner

    made = []

    def make(**kw):
        kw.setdefault("n_ctx", 512)
        kw.setdefault("n_threads", 2)
        r = Runner.spawn(default_model_path, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        if r.process is not None and r.process.poll() is None:
            os.kill(r.process.pid, signal.SIGCONT)
        r.close(timeout=5)
