"""A pool of runner processes, one per model, within a memory budget.

    pool = RunnerPool(max_loaded=2, memory_budget=8 << 30, keep_alive=300)
    text, final = pool.complete("default", "Hello", num_predict=16).text()
    stream = await pool.acomplete("/models/other.gguf", "Hi")   # asyncio
    pool.state()                                                # models, memory, queues

What the pool decides is :class:`runner.process.pool_policy.PoolPolicy`'s (pure, see
its invariants); this module carries the decisions out with processes
(``Runner.spawn``, ``Runner.close``) and threads:

* A request for a ready model takes a :class:`Lease` on its runner at once.
* A request for a loading model waits for that one load.
* A request for a cold model reads the model's estimate (runner/process/pool_fit.py)
  and ``discover``'s free memory, then loads it on a load thread after
  unloading idle least-recently-used runners the policy picked; when busy
  runners hold the room it waits in a FIFO queue, re-decided whenever a
  runner goes idle or is unloaded; when it can never fit it fails at once
  with the numbers.
* A keeper thread unloads runners idle past their keep-alive and notices
  runners that died while idle; a stream notices a death mid-request.  A
  dead runner's requests fail with :class:`RunnerCrashed`; the next request
  starts it again, and a model that fails twice in a row is refused with
  :class:`ModelFailed` until :meth:`RunnerPool.reset`.
* A request that fails with an error the runner reports about itself
  (``internal``, ``not_ready``) makes the pool ask that runner's ``health``
  on a thread of its own; a runner in state ``error`` (it lost a remote
  device holding part of its model, docs/rpc.md) is stopped and counted
  like a dead one.

Every decision is logged on the ``runner.pool`` logger and kept in
:meth:`RunnerPool.events`.  Waiting callers hold ``concurrent.futures``
futures, so threads (``result()``) and event loops (``wrap_future``) wait
the same way.

Locking: ``RunnerPool._lock`` guards the policy, ``_runners``,
``_generation``, ``_joiners``, ``_pending``, ``_events`` and ``_closed``.
Nothing slow runs under it: spawns, closes, ``discover`` and GGUF reads
happen outside, on the caller's, a load or the keeper thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import msgspec

from runner.engine.requests import Chunk, EngineError, Final
from runner.model.models import resolve_model
from runner.process import pool_fit
from runner.process.client import Media, Runner, RunnerGone, describe_exit
from runner.process.pool_policy import Admission, PoolPolicy, Room

log = logging.getLogger("runner.pool")

_POLL_DEATHS = 0.5  # seconds between the keeper's checks for runners that died while idle
_HEALTH_TIMEOUT = 10.0  # seconds a health check after a failed request waits for the answer
# Codes of errors a runner reports about itself rather than about the request:
# after one the pool asks the runner whether it can still serve.
_SELF_ERRORS = ("internal", "not_ready")


class PoolError(EngineError):
    """A request the pool cannot serve."""

    code = "unavailable"


class DoesNotFit(PoolError):
    """The model does not fit in the budget or on its devices, now or ever; the message has the numbers."""


class ModelFailed(PoolError):
    """The model failed twice in a row; refused until ``pool.reset(model)``."""


class ModelLoadError(PoolError):
    """Loading the model failed (the cause is chained)."""


class PoolClosed(PoolError):
    """The pool was closed."""


class RunnerCrashed(RunnerGone):
    """The model's runner died while serving this request."""


@dataclass
class _Pending:
    """A request waiting for a decision that needs room."""

    model: str                     # the pool's name of the model
    need: int                      # bytes its runner needs (estimate)
    room: Room                     # discover's reading when the request came
    used_then: int                 # bytes the pool held at that reading
    future: concurrent.futures.Future  # gets the Lease, or the error
    keep_alive: float | None       # the request's keep-alive, or None


class Lease:
    """A request's hold on a ready runner: the runner is not evicted or
    expired while any lease on it is held.  Released exactly once."""

    def __init__(self, pool: "RunnerPool", model: str, runner: Runner, generation: int) -> None:
        self.model = model            # the pool's name of the model
        self.runner = runner          # the model's runner process
        self._pool = pool
        self._generation = generation  # which start of the model's runner this is
        self._released = False

    def release(self, answered: bool = True) -> None:
        """Let go; ``answered``: the runner replied (it is healthy)."""
        if not self._released:
            self._released = True
            self._pool._release(self, answered)

    def failed(self, exc: BaseException) -> None:
        """The request ended with ``exc`` (not a death: see :meth:`crashed`).
        An error the runner reports about itself (``internal``,
        ``not_ready``) does not show it healthy, and makes the pool ask its
        ``health``."""
        own = (isinstance(exc, EngineError) and not isinstance(exc, RunnerGone)
               and exc.code in _SELF_ERRORS)
        self.release(answered=isinstance(exc, EngineError) and not own)
        if own:
            self._pool._check_health_later(self.model, self._generation, self.runner)

    def crashed(self, exc: RunnerGone) -> PoolError | RunnerCrashed:
        """The runner died under this request: tell the pool; the error to raise."""
        self.release(answered=False)
        if self._pool._closed:
            return PoolClosed(f"the pool was closed during the request ({exc})")
        self._pool._runner_died(self.model, self._generation, str(exc))
        return RunnerCrashed(f"the runner of model {self.model!r} died during the request: {exc}; "
                             f"the pool starts it again on the next request",
                             exc.returncode, exc.stderr_line)


class RunnerPool:
    """Runner processes for many models, loaded on demand within limits.

    ``max_loaded``: runners loaded (or loading) at once; ``memory_budget``:
    bytes their estimates may add up to; ``keep_alive``: idle seconds before
    a runner is unloaded (None: never; a request's ``keep_alive`` overrides
    it for its model, as in Ollama).  ``load``: the ``load`` fields every
    model gets (docs/protocol.md); :meth:`configure` sets one model's.
    ``log_level``, ``env`` and ``load_timeout`` go to ``Runner.spawn``.
    """

    def __init__(self, *, max_loaded: int | None = None, memory_budget: int | None = None,
                 keep_alive: float | None = 300.0, load: dict[str, Any] | None = None,
                 log_level: str = "WARNING", env: dict[str, str] | None = None,
                 load_timeout: float = 300.0) -> None:
        self._policy = PoolPolicy(max_loaded=max_loaded, memory_budget=memory_budget,
                                  keep_alive=keep_alive)
        pool_fit.load_message(load or {})  # a bad field fails here, not at the first request
        self._load = dict(load or {})       # load fields for every model
        self._model_load: dict[str, dict[str, Any]] = {}  # model -> its own load fields
        self._spawn = {"log_level": log_level, "env": env, "load_timeout": load_timeout}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # wakes the keeper
        self._cold = threading.Lock()       # one cold-model estimate at a time (discover is a process)
        self._runners: dict[str, Runner] = {}  # model -> its ready runner
        self._generation: collections.Counter[str] = collections.Counter()  # model -> starts and stops
        self._joiners: dict[str, list[tuple[concurrent.futures.Future, float | None]]] = {}  # loading model -> waiters
        self._pending: collections.deque[_Pending] = collections.deque()  # waiting for room, FIFO
        self._needs: dict[tuple[str, bool], int] = {}  # (model, on GPU) -> estimated bytes
        self._room: Room | None = None      # the last discover reading
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._threads: set[threading.Thread] = set()  # load, unload and health-check threads running
        self._checking: set[tuple[str, int]] = set()  # (model, generation) whose health is being asked
        self._closed = False
        self._keeper = threading.Thread(target=self._keep, name="runner-pool-keeper", daemon=True)
        self._keeper.start()

    # -- configuration -------------------------------------------------------------

    def configure(self, model: str, **load: Any) -> None:
        """Set ``model``'s own load fields (over the pool's); used at its next load."""
        pool_fit.load_message({**self._load, **load})
        with self._lock:
            self._model_load[model] = load
            for key in [k for k in self._needs if k[0] == model]:
                del self._needs[key]

    def reset(self, model: str) -> None:
        """Forget ``model``'s failures, so that the next request starts it again."""
        with self._lock:
            self._policy.reset(model)
            self._event("reset", model, "failures forgotten")

    # -- requests ------------------------------------------------------------------

    def complete(self, model: str, prompt: str | list[int], *, timeout: float | None = None,
                 keep_alive: float | None = None, add_special: bool = True, media: Media = None,
                 **options: Any) -> "PoolStream":
        """Start a completion on ``model``'s runner (loading it first if needed).

        ``timeout`` bounds the wait for the runner (load, room); ``options``
        are the completion options (``Runner.complete``).
        """
        lease = _wait(self._request(model, keep_alive), timeout, model)
        return PoolStream(lease, _start(lease, lease.runner.complete, prompt, add_special=add_special,
                                        media=media, **options))

    async def acomplete(self, model: str, prompt: str | list[int], *, timeout: float | None = None,
                        keep_alive: float | None = None, add_special: bool = True,
                        media: Media = None, **options: Any) -> "AsyncPoolStream":
        """The asyncio flavour of :meth:`complete`: ``async for`` over the result."""
        lease = await self._alease(model, timeout, keep_alive)
        return AsyncPoolStream(lease, _start(lease, lease.runner.acomplete, prompt,
                                             add_special=add_special, media=media, **options))

    def chat(self, model: str, messages: list[dict], *, timeout: float | None = None,
             keep_alive: float | None = None, **fields: Any) -> "PoolStream":
        """A chat completion on ``model``'s runner (``Runner.chat``'s fields:
        tools, add_generation_prompt, ..., and the completion options)."""
        lease = _wait(self._request(model, keep_alive), timeout, model)
        return PoolStream(lease, _start(lease, lease.runner.chat, messages, **fields))

    async def achat(self, model: str, messages: list[dict], *, timeout: float | None = None,
                    keep_alive: float | None = None, **fields: Any) -> "AsyncPoolStream":
        """The asyncio flavour of :meth:`chat`."""
        lease = await self._alease(model, timeout, keep_alive)
        return AsyncPoolStream(lease, _start(lease, lease.runner.achat, messages, **fields))

    async def _alease(self, model: str, timeout: float | None, keep_alive: float | None) -> "Lease":
        future = self._request_known(model, keep_alive)
        if future is None:
            # The request goes on in its thread even if this task is
            # cancelled meanwhile; the lease it may grant later is given back.
            asking = asyncio.ensure_future(asyncio.to_thread(self._request, model, keep_alive))
            try:
                future = await asyncio.shield(asking)
            except BaseException:
                asking.add_done_callback(_give_up_request)
                raise
        return await _await(future, timeout, model)

    def hold(self, model: str, *, timeout: float | None = None,
             keep_alive: float | None = None) -> "_Hold":
        """``with pool.hold(model) as runner:`` any call on the model's runner
        (embed, tokenize, info) while it cannot be unloaded."""
        return _Hold(self, model, timeout, keep_alive)

    def unload(self, model: str) -> bool:
        """Unload ``model`` now if it is idle; False if it is busy or not loaded."""
        with self._lock:
            if model not in self._policy.idle():
                return False
            runner = self._take(model)
            self._event("unload", model, "asked by the caller")
        self._stop_later(model, runner)
        return True

    # -- reading -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Models, memory and queues, as plain data (for logs and status pages)."""
        with self._lock:
            now = time.monotonic()
            policy = self._policy
            models: dict[str, dict[str, Any]] = {}
            for m, e in policy.entries.items():
                runner = self._runners.get(m)
                models[m] = {
                    "state": e.state, "need": e.need, "in_flight": e.in_flight,
                    "idle_s": round(now - e.last_used, 3) if e.state == "ready" and not e.in_flight else 0.0,
                    "keep_alive": e.keep_alive if e.keep_alive is not None else policy.keep_alive,
                    "pid": runner.process.pid if runner is not None and runner.process else None,
                    "waiting": len(self._joiners.get(m, ())),
                    "failures": len(policy.crashes.get(m, ())),
                }
            for m, need in policy.unloading.items():
                models[m] = {"state": "unloading", "need": need}
            for m, report in policy.failed.items():
                models[m] = {"state": "failed", "report": report}
            room = self._room
            return {
                "models": models,
                "memory": {"budget": policy.memory_budget, "used": policy.used(),
                           "free": room.free if room else None, "total": room.total if room else None,
                           "devices": room.where if room else None},
                "queues": {"waiting_for_room": [p.model for p in self._pending],
                           "waiting_for_load": {m: len(j) for m, j in self._joiners.items() if j}},
                "max_loaded": policy.max_loaded,
                "keep_alive": policy.keep_alive,
            }

    def events(self) -> list[dict[str, Any]]:
        """The pool's recent decisions, oldest first: ``{"time", "event", "model", "detail"}``."""
        with self._lock:
            return list(self._events)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop every runner; waiting and later requests fail with :class:`PoolClosed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runners = list(self._runners.items())
            self._runners.clear()
            waiting = [p.future for p in self._pending]
            waiting += [f for joiners in self._joiners.values() for f, _ in joiners]
            self._pending.clear()
            self._joiners.clear()
            threads = list(self._threads)
            self._event("close", "", f"stopping {len(runners)} runner(s)")
            self._changed.notify_all()
        for future in waiting:
            _fail(future, PoolClosed("the pool was closed"))
        for _, runner in runners:
            runner.close()
        for thread in threads:
            thread.join(60.0)
        self._keeper.join()

    def __enter__(self) -> "RunnerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "RunnerPool":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.close)

    # -- admission -------------------------------------------------------------------

    def _request(self, model: str, keep_alive: float | None) -> concurrent.futures.Future:
        """A future that gets a :class:`Lease` on ``model``'s runner (blocks
        for a cold model's estimate and discover, never for a load)."""
        future = self._request_known(model, keep_alive)
        if future is not None:
            return future
        with self._cold:  # concurrent requests for one cold model: one estimate, then they join
            future = self._request_known(model, keep_alive)
            if future is not None:
                return future
            future = concurrent.futures.Future()
            try:
                pending = self._estimate(model, future, keep_alive)
            except Exception as exc:
                with self._lock:
                    self._event("refuse", model, f"no estimate: {type(exc).__name__}: {exc}")
                raise
            with self._lock:
                if self._closed:
                    raise PoolClosed("the pool was closed")
                self._decide(pending)
            return future

    def _request_known(self, model: str, keep_alive: float | None) -> concurrent.futures.Future | None:
        """The future when ``model`` is ready, loading or failed; None when cold."""
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool was closed")
            runner = self._runners.get(model)
            dead = None
            if runner is not None and runner.returncode is not None:  # died idle, not noticed yet
                dead = self._drop_dead(model, describe_exit(runner.returncode, None))
            entry = self._policy.entries.get(model)
            if entry is None and model not in self._policy.failed:
                future = None
            else:
                future = concurrent.futures.Future()
                self._decide(_Pending(model, entry.need if entry else 0, Room(0, 0), 0, future,
                                      keep_alive))
        if dead is not None:
            dead.close(timeout=1.0)
        return future

    def _estimate(self, model: str, future: concurrent.futures.Future,
                  keep_alive: float | None) -> _Pending:
        """What ``model`` needs and where it would go (outside the lock: reads files, runs discover)."""
        path = str(resolve_model(model))
        load = pool_fit.load_message(self._load_fields(model))
        devices = self._devices()
        on_gpu = pool_fit.offloads(devices, load)
        room = pool_fit.room(devices, load)
        need = self._needs.get((model, on_gpu))
        if need is None:
            need = self._needs[(model, on_gpu)] = pool_fit.footprint(path, load, on_gpu)
        with self._lock:
            self._room = room
            used = self._policy.used()
        return _Pending(model, need, room, used, future, keep_alive)

    def _devices(self) -> list[dict[str, Any]]:
        """``discover`` from a ready runner, or from a child process when none is loaded."""
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            try:
                return [msgspec.to_builtins(d) for d in runner.discover(timeout=10.0)]
            except Exception as exc:  # it died meanwhile: the keeper will notice
                log.debug("pool: discover through a runner failed: %s", exc)
        return pool_fit.discover_here()

    def _decide(self, p: _Pending) -> bool:
        """Admit, queue or refuse ``p`` (lock held); False when it must wait for room."""
        room = p.room
        if room.free > 0:  # what the pool let go of since the reading is free again
            room = dataclasses.replace(room, free=room.free + p.used_then - self._policy.used())
        admission = self._policy.admit(p.model, p.need, room)
        self._carry(p, admission)
        return admission.kind != "wait"

    def _carry(self, p: _Pending, a: Admission) -> None:
        model = p.model
        if a.kind == "use":
            log.debug("pool: %s ready, request admitted", model)
            _grant(p.future, lambda: self._lease(model, p.keep_alive))
        elif a.kind == "join":
            self._joiners[model].append((p.future, p.keep_alive))
            self._event("join", model, f"waits for the load ({len(self._joiners[model])} waiting)")
        elif a.kind == "load":
            self._start_load(p, a)
        elif a.kind == "wait":
            self._pending.append(p)
            if len(self._pending) == 1:
                self._policy.draining = set(a.drain)
            self._event("wait", model, a.reason + (f"; new requests for {', '.join(a.drain)} wait too"
                                                   if len(self._pending) == 1 and a.drain else ""))
        else:
            self._event("refuse", model, a.reason)
            kind = ModelFailed if model in self._policy.failed else DoesNotFit
            _fail(p.future, kind(a.reason))

    def _start_load(self, p: _Pending, a: Admission) -> None:
        evicted = []
        for victim in a.evict:
            evicted.append((victim, self._runners.pop(victim)))
            self._generation[victim] += 1
            self._event("evict", victim, f"idle, least recently used: room for {p.model}")
        self._policy.start_load(p.model, p.need, a.evict, time.monotonic())
        self._generation[p.model] += 1
        self._joiners[p.model] = [(p.future, p.keep_alive)]
        self._event("load", p.model, a.reason)
        thread = threading.Thread(target=self._load_runner, name="runner-pool-load",
                                  args=(p.model, self._generation[p.model], evicted), daemon=True)
        self._threads.add(thread)
        thread.start()

    def _drain(self) -> None:
        """Decide the requests waiting for room again, in order (lock held).

        A request that still needs room keeps its place, and later ones that
        would load a model wait behind it; requests for a model that is now
        ready or loading go ahead."""
        blocked = False
        waiting: collections.deque[_Pending] = collections.deque()
        self._policy.draining = set()
        for p in self._pending:
            if p.future.cancelled():
                continue
            entry_known = p.model in self._policy.entries or p.model in self._policy.failed
            if blocked and not entry_known:
                waiting.append(p)
                continue
            room = p.room
            if room.free > 0:
                room = dataclasses.replace(room, free=room.free + p.used_then - self._policy.used())
            admission = self._policy.admit(p.model, p.need, room)
            if admission.kind == "wait":
                if not blocked:
                    blocked = True
                    self._policy.draining = set(admission.drain)
                waiting.append(p)
                continue
            self._carry(p, admission)
        self._pending = waiting

    def _lease(self, model: str, keep_alive: float | None) -> Lease:
        """Take ``model``'s ready runner for one request (lock held)."""
        self._policy.acquire(model, keep_alive)
        return Lease(self, model, self._runners[model], self._generation[model])

    def _release(self, lease: Lease, answered: bool) -> None:
        with self._lock:
            model = lease.model
            if self._generation[model] != lease._generation or model not in self._policy.entries:
                return  # that runner is gone already
            self._policy.release(model, time.monotonic(), answered)
            if self._policy.entries[model].in_flight == 0:
                self._drain()
                self._changed.notify_all()

    # -- processes -----------------------------------------------------------------

    def _load_fields(self, model: str) -> dict[str, Any]:
        return {**self._load, **self._model_load.get(model, {})}

    def _load_runner(self, model: str, generation: int, evicted: list[tuple[str, Runner]]) -> None:
        """On a load thread: stop the evicted runners, then spawn ``model``'s."""
        try:
            for name, runner in evicted:
                self._stop(name, runner)
            started = time.monotonic()
            try:
                runner = Runner.spawn(str(resolve_model(model)), **self._spawn, **self._load_fields(model))
            except Exception as exc:
                self._load_failed(model, generation, exc)
                return
            with self._lock:
                if self._closed or self._generation[model] != generation:
                    stale = True
                else:
                    stale = False
                    self._runners[model] = runner
                    self._policy.loaded(model, time.monotonic())
                    self._event("ready", model, f"pid {runner.process.pid}, loaded in "
                                f"{time.monotonic() - started:.2f} s")
                    for future, keep_alive in self._joiners.pop(model, []):
                        _grant(future, lambda k=keep_alive: self._lease(model, k))
                    self._drain()
                    self._changed.notify_all()
            if stale:
                runner.close()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _load_failed(self, model: str, generation: int, exc: Exception) -> None:
        why = f"load failed: {type(exc).__name__}: {exc}"
        with self._lock:
            if self._generation[model] != generation:
                return
            self._generation[model] += 1
            reported = self._policy.failure(model, why)
            self._event("load_failed", model, why + ("; " + self._policy.failed[model] if reported else ""))
            joiners = self._joiners.pop(model, [])
            self._drain()
            self._changed.notify_all()
        error = ModelLoadError(f"loading {model!r} failed: {exc}")
        error.__cause__ = exc
        for future, _ in joiners:
            _fail(future, error)

    def _runner_died(self, model: str, generation: int, why: str, unhealthy: bool = False) -> None:
        """``model``'s runner of that generation died (or, ``unhealthy``,
        says it cannot serve any more): drop it, count the failure, stop it
        (an unhealthy one is alive: it gets time to shut down cleanly)."""
        with self._lock:
            if self._generation[model] != generation or model not in self._runners:
                return  # noticed already, or it was being stopped by the pool
            runner = self._drop_dead(model, why, unhealthy)
        runner.close(timeout=10.0 if unhealthy else 1.0)

    def _drop_dead(self, model: str, why: str, unhealthy: bool = False) -> Runner:
        """Remove a dead (or unhealthy) runner and count the failure (lock
        held); the caller closes it."""
        runner = self._take(model, unloading=False)
        event = "unhealthy" if unhealthy else "crashed"
        reported = self._policy.failure(model, f"runner {'unhealthy' if unhealthy else 'died'}: {why}")
        if reported:
            self._event(event, model, f"{why}; {self._policy.failed[model]}")
        else:
            self._event(event, model, f"{why}; the next request starts it again")
        self._drain()
        self._changed.notify_all()
        return runner

    def _check_health_later(self, model: str, generation: int, runner: Runner) -> None:
        """Ask ``runner`` (``model``'s, of that generation) for its health on
        a thread of its own, once at a time (see :meth:`_check_health`)."""
        key = (model, generation)
        with self._lock:
            if self._closed or self._generation[model] != generation or key in self._checking:
                return
            self._checking.add(key)
            thread = threading.Thread(target=self._check_health, args=(model, generation, runner),
                                      name="runner-pool-health", daemon=True)
            self._threads.add(thread)
        thread.start()

    def _check_health(self, model: str, generation: int, runner: Runner) -> None:
        """A runner whose ``health`` says ``error`` after its load cannot
        serve any more (a lost remote device): it is dropped and stopped like
        a dead one, and the next request starts a new runner."""
        try:
            try:
                health = runner.health(timeout=_HEALTH_TIMEOUT)
            except RunnerGone as exc:
                self._runner_died(model, generation, str(exc))
                return
            except Exception as exc:  # no answer in time: the next failure asks again
                with self._lock:
                    self._event("health", model, f"no health answer: {type(exc).__name__}: {exc}")
                return
            if health.state == "error":
                self._runner_died(model, generation, health.error or "state error", unhealthy=True)
        finally:
            with self._lock:
                self._checking.discard((model, generation))
                self._threads.discard(threading.current_thread())

    def _take(self, model: str, unloading: bool = True) -> Runner:
        """Remove ``model``'s runner from the pool (lock held); its memory counts until stopped."""
        runner = self._runners.pop(model)
        self._generation[model] += 1
        if unloading:
            self._policy.unload(model)
        return runner

    def _stop(self, model: str, runner: Runner) -> None:
        """Stop an unloaded runner (outside the lock), then give its memory back."""
        runner.close()
        with self._lock:
            self._policy.unloaded(model)
            self._event("unloaded", model, "runner stopped")
            self._drain()
            self._changed.notify_all()

    def _stop_later(self, model: str, runner: Runner) -> None:
        thread = threading.Thread(target=self._stop_thread, args=(model, runner),
                                  name="runner-pool-unload", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _stop_thread(self, model: str, runner: Runner) -> None:
        try:
            self._stop(model, runner)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _keep(self) -> None:
        """The keeper thread: keep-alive expiry and runners that died while idle."""
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                expired = []
                for model in self._policy.expired(now):
                    idle = now - self._policy.entries[model].last_used
                    expired.append((model, self._take(model)))
                    self._event("expire", model, f"idle {idle:.1f} s, past its keep-alive")
                dead = [(m, self._generation[m], r) for m, r in self._runners.items()
                        if r.returncode is not None]
            for model, runner in expired:
                self._stop_later(model, runner)
            for model, generation, runner in dead:
                self._runner_died(model, generation, describe_exit(runner.returncode, None))
            with self._lock:
                if self._closed:
                    return
                wait = _POLL_DEATHS
                expiry = self._policy.next_expiry()
                if expiry is not None:
                    wait = min(wait, max(expiry - time.monotonic(), 0.01))
                self._changed.wait(wait)

    def _event(self, event: str, model: str, detail: str) -> None:
        """Log one decision and keep it for :meth:`events` (lock held)."""
        log.info("pool: %s %s: %s", event, model, detail)
        self._events.append({"time": time.monotonic(), "event": event, "model": model, "detail": detail})


# -- streams and waiting ---------------------------------------------------------------

class _LeasedStream:
    """What both stream flavours share: the runner's stream and the lease
    that ends with it.  The end of the stream or its Final releases the lease
    (the runner answered); an error reply fails it, which releases it (a
    cancel counts as no answer); a runner that died under it reports the
    crash, and the pool's error is raised instead."""

    def __init__(self, lease: Lease, stream: Any) -> None:
        self.model = lease.model       # the pool's name of the model
        self._lease = lease
        self._stream = stream          # the runner's CompletionStream or AsyncCompletionStream

    def _passed(self, event: Chunk | Final) -> Chunk | Final:
        """An event from the runner's stream, on its way to the caller."""
        if type(event) is Final:
            self._lease.release()
        return event

    def _raise(self, exc: BaseException) -> NoReturn:
        """Raise what ``exc``, raised by the runner's stream, becomes."""
        if isinstance(exc, (StopIteration, StopAsyncIteration)):
            self._lease.release()
        elif isinstance(exc, RunnerGone):
            raise self._lease.crashed(exc) from exc
        else:  # an error reply means the runner answered; a cancel does not
            self._lease.failed(exc)
        raise exc

    @staticmethod
    def _joined(events: Iterable[Chunk | Final]) -> tuple[str, Final]:
        parts, final = [], None
        for event in events:
            if type(event) is Chunk:
                parts.append(event.text)
            else:
                final = event
        assert final is not None  # a stream without a Final raises first
        return "".join(parts), final

    def cancel(self) -> None:
        self._stream.cancel()

    def close(self) -> None:
        self._stream.close()
        self._lease.release(answered=False)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class PoolStream(_LeasedStream):
    """A completion on a pooled runner: iterate for :class:`Chunk` events, then
    the :class:`Final` (as ``runner.process.client.CompletionStream``).  The lease on
    the runner ends with the stream."""

    def __iter__(self) -> "PoolStream":
        return self

    def __next__(self) -> Chunk | Final:
        try:
            event = next(self._stream)
        except BaseException as exc:
            self._raise(exc)
        return self._passed(event)

    def text(self) -> tuple[str, Final]:
        """Wait for the end; the whole text and the Final."""
        return self._joined(self)

    def __enter__(self) -> "PoolStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncPoolStream(_LeasedStream):
    """The asyncio flavour of :class:`PoolStream`."""

    def __aiter__(self) -> "AsyncPoolStream":
        return self

    async def __anext__(self) -> Chunk | Final:
        try:
            event = await self._stream.__anext__()
        except BaseException as exc:
            self._raise(exc)
        return self._passed(event)

    async def text(self) -> tuple[str, Final]:
        """Wait for the end; the whole text and the Final."""
        return self._joined([event async for event in self])

    async def aclose(self) -> None:
        self.close()


class _Hold:
    """``pool.hold(model)``: a lease as a context manager."""

    def __init__(self, pool: RunnerPool, model: str, timeout: float | None,
                 keep_alive: float | None) -> None:
        self._pool, self._model = pool, model
        self._timeout, self._keep_alive = timeout, keep_alive
        self._lease: Lease | None = None

    def __enter__(self) -> Runner:
        self._lease = _wait(self._pool._request(self._model, self._keep_alive), self._timeout, self._model)
        return self._lease.runner

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        assert self._lease is not None
        if isinstance(exc, RunnerGone) and not isinstance(exc, RunnerCrashed):
            self._lease.crashed(exc)
        elif isinstance(exc, EngineError) and not isinstance(exc, RunnerGone):
            self._lease.failed(exc)
        else:
            self._lease.release()

    async def __aenter__(self) -> Runner:
        future = self._pool._request_known(self._model, self._keep_alive)
        if future is None:
            future = await asyncio.to_thread(self._pool._request, self._model, self._keep_alive)
        self._lease = await _await(future, self._timeout, self._model)
        return self._lease.runner

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        self.__exit__(kind, exc, tb)


def _grant(future: concurrent.futures.Future, make_lease: Any) -> None:
    """Hand a lease to a waiter that is still waiting (lock held)."""
    if future.set_running_or_notify_cancel():
        future.set_result(make_lease())


def _fail(future: concurrent.futures.Future, exc: BaseException) -> None:
    if not future.done() and future.set_running_or_notify_cancel():
        future.set_exception(exc)


def _release_granted(future: concurrent.futures.Future) -> None:
    """A waiter gave up after its lease was granted: give the lease back."""
    if not future.cancelled() and future.exception() is None:
        future.result().release(answered=False)


def _give_up_request(asking: "asyncio.Future") -> None:
    """The caller left while its request was being made (``asking``: the
    task that makes it): the lease's future, once there, is cancelled, or
    its lease given back when granted."""
    if asking.cancelled() or asking.exception() is not None:
        return
    future = asking.result()
    if not future.cancel():
        future.add_done_callback(_release_granted)


def _start(lease: "Lease", call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Start a request on the leased runner; a failure to start gives the
    lease back (a runner found dead is reported as a crash)."""
    try:
        return call(*args, **kwargs)
    except RunnerGone as exc:
        raise lease.crashed(exc) from exc
    except EngineError as exc:
        lease.failed(exc)
        raise
    except BaseException:
        lease.release()
        raise


def _wait(future: concurrent.futures.Future, timeout: float | None, model: str) -> Lease:
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        if not future.cancel():
            future.add_done_callback(_release_granted)
        raise TimeoutError(f"no runner for {model!r} within {timeout} s (loading, or waiting "
                           f"for room)") from None
    except BaseException:
        if not future.cancel():
            future.add_done_callback(_release_granted)
        raise


async def _await(future: concurrent.futures.Future, timeout: float | None, model: str) -> Lease:
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except asyncio.TimeoutError:
        if not future.cancel():
            future.add_done_callback(_release_granted)
        raise TimeoutError(f"no runner for {model!r} within {timeout} s (loading, or waiting "
                           f"for room)") from None
    except BaseException:
        if not future.cancel():
            future.add_done_callback(_release_granted)
        raise


__all__ = ["RunnerPool", "PoolStream", "AsyncPoolStream", "Lease", "PoolError", "DoesNotFit",
           "ModelFailed", "ModelLoadError", "PoolClosed", "RunnerCrashed"]
