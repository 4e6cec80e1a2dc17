"""Which runners a pool keeps loaded: the pure policy behind runner/process/pool.py.

:class:`PoolPolicy` knows models by name, what each needs in bytes (the
runner's own estimate), whether it is loading, ready or being unloaded, how
many requests hold it and when it was last used.  It decides; it starts no
process and reads no clock (every call is given ``now``), so tests drive it
with plain numbers.

Invariants:

* A model is in at most one of ``entries`` (loading or ready) and
  ``unloading``.  Memory counted as in use is the sum of the needs of both:
  an unloading runner holds its memory until its process is gone.
* ``len(entries) <= max_loaded`` after every :meth:`start_load`.
* A model with ``in_flight > 0`` or still loading is never chosen for
  eviction or keep-alive expiry; evictions take idle ready models, least
  recently used first, and only as many as the new model needs.
* While a request waits for busy runners' room, new requests for those
  runners (``draining``) wait too: they go idle in finite time.
* ``crashes[m]`` counts consecutive failures of model ``m`` (a runner that
  died, or a load that failed); a request that a runner of ``m`` answered
  resets it.  At ``crash_limit`` the model is marked failed and refused until
  :meth:`reset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AdmissionKind = Literal["use", "join", "load", "wait", "refuse"]


def show_bytes(n: int) -> str:
    """``123.4 MiB``: the unit the pool's messages speak."""
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class Room:
    """Memory of the devices a model would be loaded on, as ``discover`` reports it."""

    free: int          # bytes free now (0: unknown, not checked)
    total: int         # bytes those devices hold in all (0: unknown, not checked)
    where: str = "?"   # which devices, for messages ("CPU", "CUDA0+CUDA1")


@dataclass
class Entry:
    """A model with a runner loading or loaded."""

    need: int                      # bytes the runner's estimate says it takes
    state: Literal["loading", "ready"]  # loading: the runner is being spawned
    last_used: float               # when the last request ended (or the load began)
    in_flight: int = 0             # requests holding the runner now
    keep_alive: float | None = None  # idle seconds before unloading; None: the pool's


@dataclass(frozen=True)
class Admission:
    """What to do with a request for a model."""

    kind: AdmissionKind            # use: lease the ready runner; join: wait for its load;
                                   # load: evict, then load; wait: room is held by busy
                                   # runners, ask again when one goes idle; refuse: fail now
    evict: tuple[str, ...] = ()    # idle models to unload before the load, least recently used first
    reason: str = ""               # the numbers behind a load, wait or refuse
    drain: tuple[str, ...] = ()    # wait: the busy models whose room it waits for (see draining)


@dataclass
class PoolPolicy:
    """LRU, fit and keep-alive decisions for a pool of runners (see the module doc)."""

    max_loaded: int | None = None  # runners loaded or loading at once; None: no limit
    memory_budget: int | None = None  # bytes the pool's runners may take together; None: no limit
    keep_alive: float | None = 300.0  # idle seconds before a runner is unloaded; None: never
    crash_limit: int = 2           # consecutive failures after which a model is refused
    entries: dict[str, Entry] = field(default_factory=dict)  # model -> loading or ready runner
    unloading: dict[str, int] = field(default_factory=dict)  # model -> bytes, until its process is gone
    crashes: dict[str, list[str]] = field(default_factory=dict)  # model -> why each consecutive failure
    failed: dict[str, str] = field(default_factory=dict)  # model -> report, refused until reset
    # Busy models whose room the first request waiting for room needs: new
    # requests for them wait behind it, so that steady traffic to a loaded
    # model cannot keep a waiting model out for ever.  Set by the caller from
    # that request's Admission.drain.
    draining: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.max_loaded is not None and self.max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1 or None, not {self.max_loaded}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be > 0 bytes or None, not {self.memory_budget}")
        if self.keep_alive is not None and self.keep_alive < 0:
            raise ValueError(f"keep_alive must be >= 0 seconds or None, not {self.keep_alive}")

    # -- questions -----------------------------------------------------------------

    def used(self) -> int:
        """Bytes held by runners loading, loaded or being unloaded."""
        return sum(e.need for e in self.entries.values()) + sum(self.unloading.values())

    def idle(self) -> list[str]:
        """Ready models no request holds, least recently used first."""
        ready = [(e.last_used, m) for m, e in self.entries.items()
                 if e.state == "ready" and e.in_flight == 0]
        return [m for _, m in sorted(ready)]

    def admit(self, model: str, need: int, room: Room) -> Admission:
        """Decide a request for ``model`` that needs ``need`` bytes to load."""
        if model in self.failed:
            return Admission("refuse", reason=self.failed[model])
        entry = self.entries.get(model)
        if entry is not None and model in self.draining:
            return Admission("wait", reason=f"{model} is to be unloaded for a request that waits for its room")
        if entry is not None:
            return Admission("use" if entry.state == "ready" else "join")
        if model in self.unloading:
            return Admission("wait", reason=f"{model} is being unloaded")
        budget = self.memory_budget
        if budget is not None and need > budget:
            return Admission("refuse", reason=(
                f"{model} needs {show_bytes(need)}, more than the pool's memory budget of "
                f"{show_bytes(budget)}"))
        if room.total and need > room.total:
            return Admission("refuse", reason=(
                f"{model} needs {show_bytes(need)}, more than the {show_bytes(room.total)} "
                f"that {room.where} holds in all"))
        return self._fit(model, need, room)

    def _fit(self, model: str, need: int, room: Room) -> Admission:
        evict: list[str] = []
        for candidate in [None, *self.idle()]:
            if candidate is not None:
                evict.append(candidate)
            short = self._shortfall(need, room, evict)
            if short is None:
                return Admission("load", tuple(evict), self._summary(model, need, room, evict))
        # Every idle runner would go and it still does not fit: would it once
        # the busy (and loading, and unloading) runners were gone too?
        everything = list(self.entries)
        if self._shortfall(need, room, everything, count_unloading=False) is None:
            busy = ", ".join(f"{m} ({e.in_flight} in flight)" if e.state == "ready" else f"{m} (loading)"
                             for m, e in self.entries.items() if m not in evict)
            held = ", ".join(self.unloading)
            return Admission("wait", drain=self._to_drain(need, room, evict), reason=(
                f"{model} needs {show_bytes(need)}: {short}; waiting for "
                f"{busy or held or 'an unload'} to go idle"))
        return Admission("refuse", reason=(
            f"{model} needs {show_bytes(need)}, but {room.where} has {show_bytes(room.free)} free "
            f"and the pool's runners hold {show_bytes(self.used())}: it does not fit even with every "
            f"model of the pool unloaded"))

    def _shortfall(self, need: int, room: Room, evict: list[str],
                   count_unloading: bool = True) -> str | None:
        """Why ``need`` does not fit once ``evict`` are unloaded, or None if it fits."""
        freed = sum(self.entries[m].need for m in evict)
        unloading = sum(self.unloading.values())
        if self.max_loaded is not None and len(self.entries) - len(evict) + 1 > self.max_loaded:
            return f"{len(self.entries) - len(evict)} of max_loaded={self.max_loaded} runners are loaded"
        held = self.used() - freed - (0 if count_unloading else unloading)
        if self.memory_budget is not None and held + need > self.memory_budget:
            return (f"{show_bytes(held)} of the {show_bytes(self.memory_budget)} budget is held")
        if room.free > 0:
            # Free memory as discover saw it, less what loading runners have
            # yet to take, plus what evicted and unloading runners give back.
            loading = sum(e.need for m, e in self.entries.items()
                          if e.state == "loading" and m not in evict)
            available = room.free - loading + freed + unloading
            if need > available:
                return f"{show_bytes(max(available, 0))} free on {room.where}"
        return None

    def _to_drain(self, need: int, room: Room, idle: list[str]) -> tuple[str, ...]:
        """The busy ready models, least recently used first, whose room (with
        every idle runner's) would let ``need`` in; all of them if no fewer will."""
        busy = sorted((e.last_used, m) for m, e in self.entries.items()
                      if e.state == "ready" and m not in idle)
        chosen: list[str] = []
        for _, m in busy:
            chosen.append(m)
            if self._shortfall(need, room, idle + chosen) is None:
                break
        return tuple(chosen)

    def _summary(self, model: str, need: int, room: Room, evict: list[str]) -> str:
        text = f"{model} needs {show_bytes(need)}; pool holds {show_bytes(self.used())}"
        if self.memory_budget is not None:
            text += f" of {show_bytes(self.memory_budget)}"
        if room.free > 0:
            text += f"; {show_bytes(room.free)} free on {room.where}"
        text += f"; {len(self.entries)} runner(s) loaded"
        if self.max_loaded is not None:
            text += f" of max {self.max_loaded}"
        if evict:
            text += "; unloading idle " + ", ".join(evict) + " (least recently used first)"
        return text

    def expired(self, now: float) -> list[str]:
        """Idle ready models past their keep-alive, least recently used first."""
        out = []
        for m in self.idle():
            ttl = self._ttl(m)
            if ttl is not None and now - self.entries[m].last_used >= ttl:
                out.append(m)
        return out

    def next_expiry(self) -> float | None:
        """The earliest time an idle model's keep-alive runs out (None: none will)."""
        times = [self.entries[m].last_used + ttl for m in self.idle()
                 if (ttl := self._ttl(m)) is not None]
        return min(times, default=None)

    def _ttl(self, model: str) -> float | None:
        entry = self.entries[model]
        return entry.keep_alive if entry.keep_alive is not None else self.keep_alive

    # -- changes -------------------------------------------------------------------

    def start_load(self, model: str, need: int, evict: tuple[str, ...], now: float) -> None:
        """Carry out a ``load`` admission: evicted models move to unloading."""
        for m in evict:
            self.unload(m)
        self.entries[model] = Entry(need=need, state="loading", last_used=now)

    def loaded(self, model: str, now: float) -> None:
        entry = self.entries[model]
        entry.state, entry.last_used = "ready", now

    def acquire(self, model: str, keep_alive: float | None = None) -> None:
        """A request takes the ready runner (``keep_alive``: its new idle time, as Ollama's)."""
        entry = self.entries[model]
        entry.in_flight += 1
        if keep_alive is not None:
            entry.keep_alive = keep_alive

    def release(self, model: str, now: float, answered: bool) -> None:
        """A request let go; ``answered``: the runner replied to it (it is healthy)."""
        entry = self.entries[model]
        entry.in_flight -= 1
        entry.last_used = now
        if answered:
            self.crashes.pop(model, None)

    def unload(self, model: str) -> None:
        """The model's runner is being stopped; its memory counts until :meth:`unloaded`."""
        entry = self.entries.pop(model)
        self.unloading[model] = entry.need

    def unloaded(self, model: str) -> None:
        self.unloading.pop(model, None)

    def failure(self, model: str, why: str) -> bool:
        """The model's runner died or its load failed; True when that makes it refused."""
        self.entries.pop(model, None)
        reasons = self.crashes.setdefault(model, [])
        reasons.append(why)
        if len(reasons) >= self.crash_limit:
            self.failed[model] = (
                f"{model} failed {len(reasons)} times in a row ("
                + "; ".join(f"{i + 1}: {r}" for i, r in enumerate(reasons))
                + f"); not starting it again until pool.reset({model!r})")
            return True
        return False

    def reset(self, model: str) -> None:
        """Forget the model's failures: the next request may start it again."""
        self.crashes.pop(model, None)
        self.failed.pop(model, None)
