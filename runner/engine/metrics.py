"""Running totals of an engine, and their Prometheus exposition.

:class:`EngineTotals` counts what an engine did since it was created:
requests by outcome, tokens, queue waits, and histograms of step time and
batch size.  The ``metrics`` op carries them with the gauges of the moment
(``Engine.metrics``: queue depth, KV cells per slot, cache counters), and
``info`` carries the totals as ``engine.totals``, so a parent needs no extra
dependency to read them.

:func:`render_prometheus` turns a ``metrics`` reply into the Prometheus text
format with ``prometheus_client`` (``llama-runner metrics``), under the names
listed in docs/protocol.md.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

# Upper bounds of the histogram buckets (Prometheus "le"); +Inf is implied.
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
QUEUE_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)
GRAMMAR_SECONDS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# Outcomes a completion is counted under: its final done_reason, or the
# error code it was refused with before it was queued.
OUTCOMES = ("stop", "length", "cancelled", "error", "busy", "bad_request", "input_too_long",
            "not_ready", "internal")


@dataclass
class Histogram:
    """Counts of observations per bucket (cumulative only when exported)."""

    bounds: tuple                      # upper bounds, ascending
    counts: list[int] = field(default_factory=list)  # per bucket, the last one is +Inf
    total: float = 0.0                 # sum of the observations
    n: int = 0                         # observations

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` ``times`` times."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.n += times

    def snapshot(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total, "count": self.n}


class EngineTotals:
    """Everything an engine counts.  Any thread may record; ``_lock`` guards
    every field (one uncontended acquire per request and per step)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)      # completions by outcome
        self.prompt_tokens = 0                          # prompt inputs of finished completions
        self.prompt_eval_tokens = 0                     # of which evaluated
        self.cached_tokens = 0                          # of which reused from a slot or the host tier
        self.generated_tokens = 0                       # tokens returned by finished completions
        self.embeddings = 0                             # embedding requests served
        self.steps = 0                                  # decodes
        self.step_seconds = Histogram(STEP_SECONDS_BUCKETS)   # decode time per step
        self.batch_tokens = Histogram(BATCH_TOKENS_BUCKETS)   # inputs per decode
        self.queue_seconds = Histogram(QUEUE_SECONDS_BUCKETS)  # submit to admission, per completion
        # per pick a grammar rejected: its redraw over the whole vocabulary,
        # on a worker thread (runner.engine.executor.PickResolver)
        self.grammar_redraw_seconds = Histogram(GRAMMAR_SECONDS_BUCKETS)

    def finished(self, done_reason: str, prompt_count: int, prompt_eval_count: int,
                 cached_count: int, eval_count: int) -> None:
        with self._lock:
            key = done_reason if done_reason in self.requests else "error"
            self.requests[key] += 1
            self.prompt_tokens += prompt_count
            self.prompt_eval_tokens += prompt_eval_count
            self.cached_tokens += cached_count
            self.generated_tokens += eval_count

    def refused(self, code: str) -> None:
        with self._lock:
            self.requests[code if code in self.requests else "internal"] += 1

    def admitted(self, waited: float) -> None:
        with self._lock:
            self.queue_seconds.observe(waited)

    def step(self, seconds: float, n_tokens: int, steps: int = 1) -> None:
        """``steps`` decodes of ``n_tokens`` inputs each, ``seconds`` each
        (a native run's steps are counted at their mean)."""
        with self._lock:
            self.steps += steps
            self.step_seconds.observe(seconds, steps)
            self.batch_tokens.observe(n_tokens, steps)

    def grammar_redraw(self, seconds: float) -> None:
        with self._lock:
            self.grammar_redraw_seconds.observe(seconds)

    def embedded(self) -> None:
        with self._lock:
            self.embeddings += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.requests), "prompt_tokens": self.prompt_tokens,
                    "prompt_eval_tokens": self.prompt_eval_tokens, "cached_tokens": self.cached_tokens,
                    "generated_tokens": self.generated_tokens, "embeddings": self.embeddings,
                    "steps": self.steps, "step_seconds": self.step_seconds.snapshot(),
                    "batch_tokens": self.batch_tokens.snapshot(),
                    "queue_seconds": self.queue_seconds.snapshot(),
                    "grammar_redraw_seconds": self.grammar_redraw_seconds.snapshot()}


def render_prometheus(metrics: dict[str, Any]) -> bytes:
    """The Prometheus text exposition of a ``metrics`` reply (as plain data)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

    class _Collector:
        def collect(self):
            c = CounterMetricFamily("llama_runner_requests", "Completions by outcome "
                                    "(done_reason, or the error code of a refusal)", labels=["outcome"])
            for outcome, n in metrics["requests"].items():
                c.add_metric([outcome], n)
            yield c
            for name, doc in (("prompt_tokens", "Prompt inputs of finished completions"),
                              ("prompt_eval_tokens", "Prompt inputs evaluated"),
                              ("cached_tokens", "Prompt inputs reused from the KV cache"),
                              ("generated_tokens", "Tokens returned by finished completions"),
                              ("embeddings", "Embedding requests served"),
                              ("steps", "Decodes")):
                yield CounterMetricFamily(f"llama_runner_{name}", doc, value=metrics[name])
            for name, unit_doc in (("step_seconds", "Decode time per step"),
                                   ("batch_tokens", "Inputs per decode"),
                                   ("queue_seconds", "Wait from submission to a slot"),
                                   ("grammar_redraw_seconds",
                                    "Redraw of a pick a grammar rejected, off the loop")):
                h = metrics.get(name)
                if h is None:  # from a runner that predates it
                    continue
                cumulative, buckets = 0, []
                for bound, n in zip(list(h["bounds"]) + [float("inf")], h["counts"]):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
                yield HistogramMetricFamily(f"llama_runner_{name}", unit_doc, buckets=buckets,
                                            sum_value=h["sum"])
            for name, doc in (("queue_depth", "Completions waiting for a slot"),
                              ("running", "Completions holding a slot"),
                              ("in_flight", "Requests the runner is working on")):
                yield GaugeMetricFamily(f"llama_runner_{name}", doc, value=metrics[name])
            kv = GaugeMetricFamily("llama_runner_slot_kv_cells", "KV cells held per slot", labels=["slot"])
            for slot, cells in enumerate(metrics["slot_kv_cells"]):
                kv.add_metric([str(slot)], cells)
            yield kv
            for cache in ("media_cache", "host_cache"):
                info = metrics[cache]
                for key in ("hits", "misses", "evictions"):
                    yield CounterMetricFamily(f"llama_runner_{cache}_{key}", f"{cache} {key}", value=info[key])
                for key in ("bytes", "entries"):
                    yield GaugeMetricFamily(f"llama_runner_{cache}_{key}", f"{cache} {key} held", value=info[key])
            # Memory the host tier holds besides its entries: the save buffer
            # prepared ahead (it counts against cache_ram_mb too).
            yield GaugeMetricFamily("llama_runner_host_cache_spare_bytes",
                                    "host_cache bytes held in the spare save buffer",
                                    value=metrics["host_cache"].get("spare_bytes", 0))
            yield GaugeMetricFamily("llama_runner_load_seconds", "Time the model load took",
                                    value=metrics["load_seconds"])

    registry = CollectorRegistry()
    registry.register(_Collector())
    return generate_latest(registry)
