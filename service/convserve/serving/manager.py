"""ModelManager: the one place that swaps the live model (TF Serving's availability-preserving policy).

A replica polls the store's PROMOTED pointer; when it names another version, the new session is
loaded and warmed up *first*, then one attribute assignment makes it live. Callers take a
`LoadedModel` once per batch and keep that reference, so a swap never interrupts work in flight and
the old session is freed when its last batch lets go. A version that fails to load never replaces
a working one: the replica keeps serving what it has (never zero versions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from convserve.contracts.errors import NoModel, NotFound, VersionNotFound
from convserve.lifecycle import release_freed_memory
from convserve.serving.loader import LoadedModel, SessionSettings, load_version
from convserve.store.base import ModelStore

log = logging.getLogger("convserve.serving.manager")

RETRY_AFTER_S = 30.0
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class _Failure:
    version: int
    at: float        # time.monotonic() of the failed attempt
    message: str


class ManagerMetrics:
    """How long loading and warming up versions takes, and how often the live model swaps."""

    def __init__(self) -> None:
        self.load_seconds = Histogram(
            "convserve_model_load_seconds", "Loading a version: phase 'open' (verify, open the "
            "session, check it) and 'warmup'", ("phase",), buckets=LOAD_BUCKETS, registry=None)
        self.swaps = Counter("convserve_model_swaps", "Live-model swaps (a new promoted version "
                             "went live)", registry=None)
        self.store_up = Gauge("convserve_store_up", "1 while the model store answers the "
                              "pointer poll, 0 since a poll failed (the live model keeps "
                              "serving)", registry=None)
        self.poll_errors = Counter("convserve_store_poll_errors", "Pointer polls that failed "
                                   "(store unreachable, refused or broken)", registry=None)

    def loaded(self, model: LoadedModel) -> LoadedModel:
        self.load_seconds.labels("open").observe(model.open_seconds)
        self.load_seconds.labels("warmup").observe(model.warmup_seconds)
        return model

    def all(self) -> tuple[Histogram | Counter | Gauge, ...]:
        return self.load_seconds, self.swaps, self.store_up, self.poll_errors


class ModelManager:
    def __init__(self, store: ModelStore, settings: SessionSettings, *, poll_interval_s: float = 0.5,
                 cache_size: int = 4, on_live: Callable[[LoadedModel], None] | None = None,
                 retry_after_s: float = RETRY_AFTER_S) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size: expected >= 1, got {cache_size}")
        self._store = store
        self._settings = settings
        self._poll_interval_s = poll_interval_s
        self._cache_size = cache_size
        self._on_live = on_live
        self._retry_after_s = retry_after_s
        self.metrics = ManagerMetrics()
        self._live: LoadedModel | None = None
        self._pinned: OrderedDict[int, LoadedModel] = OrderedDict()  # LRU, most recent last
        self._cache_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._failure: _Failure | None = None
        self._reported: set[int] = set()  # versions whose load failure was logged already
        self._last_poll_error = ""
        # Replaced models whose memory is handed back once their last batch lets go of them.
        self._released: list[weakref.ref[LoadedModel]] = []

    # ------------------------------------------------------------------------------- serving

    @property
    def live_version(self) -> int | None:
        model = self._live
        return model.version if model is not None else None

    def current(self) -> LoadedModel:
        """The live model; hold the returned object for one batch, do not cache it."""
        model = self._live
        if model is None:
            raise NoModel(self._no_model_message())
        return model

    def get(self, version: int = 0) -> LoadedModel:
        """The live model (version 0) or a pinned version, loaded on demand into a bounded LRU."""
        if version == 0:
            return self.current()
        live = self._live
        if live is not None and live.version == version:
            return live
        # Loading under the lock too: two requests for the same cold version load it once.
        # Pinned loads are rare (rollback checks, comparisons), so serialising them is cheap.
        with self._cache_lock:
            model = self._pinned.get(version)
            if model is None:
                model = self._load_pinned(version)
                self._pinned[version] = model
                while len(self._pinned) > self._cache_size:
                    self._pinned.popitem(last=False)  # in-flight holders keep theirs alive
            self._pinned.move_to_end(version)
            return model

    def _load_pinned(self, version: int) -> LoadedModel:
        try:
            return self.metrics.loaded(load_version(self._store, version, self._settings))
        except VersionNotFound:
            raise NotFound(f"model version {version} not found; versions: "
                           f"{self._store.versions()}") from None

    def _no_model_message(self) -> str:
        failure = self._failure
        if failure is not None:
            return (f"no model is live in {self._store.url}: promoted version {failure.version} "
                    f"could not be loaded ({failure.message})")
        return (f"no model is promoted yet in {self._store.url}; train one with Train or "
                "promote a version")

    # ------------------------------------------------------------------------------- swapping

    def refresh(self) -> bool:
        """Load the promoted version if it is not the live one; True when it became live."""
        with self._refresh_lock:
            target = self._promoted()
            live = self._live
            if target is None or (live is not None and live.version == target):
                return False
            if self._recently_failed(target):
                return False
            model = self._load_for_swap(target)
            if model is None:
                return False
            self._live = model  # the swap: one reference; holders of the old one finish with it
            self.metrics.loaded(model)
            self.metrics.swaps.inc()
            if live is not None:
                self._released.append(weakref.ref(live))
            self._failure = None
            self._reported.discard(target)
            log.info("version %d is live (was %s)", target, live.version if live else "none")
            self._notify(model)
            return True

    def _promoted(self) -> int | None:
        try:
            version = self._store.promoted_version()
        except Exception as error:  # a broken pointer must not stop serving the live model
            message = f"{type(error).__name__}: {error}"
            self.metrics.store_up.set(0)
            self.metrics.poll_errors.inc()
            if not self._last_poll_error:  # once per outage, not once per poll
                log.error("cannot read the promoted version; keeping version %s live: %s",
                          self.live_version, message)
            self._last_poll_error = message
            return None
        self.metrics.store_up.set(1)
        if self._last_poll_error:
            log.warning("the model store answers again (the last error was %s)",
                        self._last_poll_error)
        self._last_poll_error = ""
        return version

    def _recently_failed(self, target: int) -> bool:
        failure = self._failure
        return (failure is not None and failure.version == target
                and time.monotonic() - failure.at < self._retry_after_s)

    def _load_for_swap(self, target: int) -> LoadedModel | None:
        with self._cache_lock:
            cached = self._pinned.pop(target, None)  # already loaded and warm as a pinned version
        if cached is not None:
            return cached
        try:
            return load_version(self._store, target, self._settings)
        except Exception as error:  # whatever the cause, the live model must stay in place
            self._record_failure(target, error)
            return None

    def _record_failure(self, version: int, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        self._failure = _Failure(version, time.monotonic(), message)
        if version in self._reported:
            log.debug("version %d still cannot be loaded: %s", version, message)
            return
        self._reported.add(version)
        log.error("promoted version %d cannot be loaded; keeping version %s live (retry in "
                  "%.0f s or when the pointer moves): %s", version, self.live_version,
                  self._retry_after_s, message)

    def _notify(self, model: LoadedModel) -> None:
        if self._on_live is None:
            return
        try:
            self._on_live(model)
        except Exception:  # the swap stands; a listener's bug must not undo or hide it
            log.exception("on_live callback failed for version %d", model.version)

    @property
    def replaced_unreleased(self) -> int:
        """Replaced models whose memory is not yet handed back: a batch still holds them, or the
        next poll's release_replaced() has not run yet."""
        return len(self._released)

    def release_replaced(self) -> bool:
        """When a replaced model has been freed (no batch holds it any more), return the memory
        it used to the system; True when that happened now."""
        alive = [ref for ref in self._released if ref() is not None]
        if len(alive) == len(self._released):
            return False
        self._released = alive
        release_freed_memory()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Poll the pointer every poll_interval_s (loading in a worker thread) until `stop`."""
        last_error = ""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.refresh)
                self.release_replaced()
                last_error = ""
            except Exception as error:  # the loop must outlive any single refresh
                if repr(error) != last_error:
                    log.exception("model refresh failed; polling on")
                last_error = repr(error)
            with contextlib.suppress(TimeoutError):  # the poll interval passed: poll again
                await asyncio.wait_for(stop.wait(), timeout=self._poll_interval_s)
