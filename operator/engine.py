"""A work queue of job keys, served by a pool of threads (the controller-runtime pattern).

A key is queued once however many events arrive for it; a key being reconciled is marked dirty
and reconciled again afterwards, so one job is never reconciled by two threads at once. A
reconcile returns when it wants to run again (a backoff, a deadline, the next progress poll) or
None: a finished job with nothing pending has no timer at all. Workers run only while `gate()`
says this operator is the active one (leader election).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)
# A reconcile that raised is tried again after this (and then less often, up to the cap).
ERROR_BACKOFF = (1.0, 60.0)


class WorkQueue:
    def __init__(self, reconcile: Callable[[Hashable], float | None], workers: int,
                 gate: Callable[[], bool] = lambda: True) -> None:
        self._reconcile = reconcile
        self._gate = gate
        self._workers = workers
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # workers wait on it for keys
        self._timer = threading.Condition(lock)  # the timer thread waits on its own: a new key never wakes it instead
        self._ready: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._running: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._due: dict[Hashable, float] = {}  # key -> when its delayed reconcile is due
        self._heap: list[tuple[float, int, Hashable]] = []
        self._order = itertools.count()
        self._failures: dict[Hashable, int] = {}
        self._stopped = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ queueing
    def add(self, key: Hashable, urgent: bool = False) -> None:
        """Queue `key`; `urgent` ones (a new or edited job) go before the routine ones."""
        with self._cond:
            self._add_locked(key, urgent)

    def _add_locked(self, key: Hashable, urgent: bool = False) -> None:
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            if urgent:
                self._ready.appendleft(key)
            else:
                self._ready.append(key)
            self._cond.notify()
        elif urgent:  # already waiting behind routine work: move it to the front
            self._ready.remove(key)
            self._ready.appendleft(key)

    def add_after(self, key: Hashable, seconds: float) -> None:
        """Reconcile `key` in `seconds` (an earlier request for the same key wins)."""
        if seconds <= 0:
            self.add(key)
            return
        due = time.monotonic() + seconds
        with self._cond:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._order), key))
            self._timer.notify()

    def forget(self, key: Hashable) -> None:
        """The job is gone: drop its timer and failure count (a queued reconcile finds it gone)."""
        with self._cond:
            self._due.pop(key, None)
            self._failures.pop(key, None)

    def delayed(self) -> int:
        """How many keys have a timer (finished jobs have none)."""
        with self._cond:
            return len(self._due)

    def pending(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._running)

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        for index in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        timer = threading.Thread(target=self._tick, name="reconcile-timer", daemon=True)
        timer.start()
        self._threads.append(timer)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            self._timer.notify_all()

    def wake(self) -> None:
        """The gate may have opened: let waiting workers look again."""
        with self._cond:
            self._cond.notify_all()

    def _next_key(self) -> Hashable | None:
        with self._cond:
            while not self._stopped and (not self._ready or not self._gate()):
                self._cond.wait(timeout=1.0)
            if self._stopped:
                return None
            key = self._ready.popleft()
            self._queued.discard(key)
            self._running.add(key)
            return key

    def _work(self) -> None:
        while True:
            key = self._next_key()
            if key is None:
                return
            again: float | None = None
            try:
                again = self._reconcile(key)
                self._failures.pop(key, None)
            except Exception:  # a bug or an outage: log it, try again later, never crash the pool
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                again = min(ERROR_BACKOFF[0] * 2 ** (failures - 1), ERROR_BACKOFF[1])
                log.exception("reconcile of %s failed (attempt %d); again in %.0f s", key, failures, again)
            finally:
                with self._cond:
                    self._running.discard(key)
                    if key in self._dirty:
                        self._dirty.discard(key)
                        self._add_locked(key)
            if again is not None:
                self.add_after(key, again)

    def _tick(self) -> None:
        """Move keys whose time has come to the ready queue."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due, _, key = heapq.heappop(self._heap)
                    if self._due.get(key) == due:
                        del self._due[key]
                        self._add_locked(key)
                wait = self._heap[0][0] - now if self._heap else 5.0
                self._timer.wait(timeout=max(0.01, min(wait, 5.0)))
