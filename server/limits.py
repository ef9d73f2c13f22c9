"""Rate limits: registrations per key per hour, messages per second on a stream.

`RateCounter` counts events per name in a window and says how long to wait once the limit
is reached. The in-memory counter serves one process (the embedded store); the Redis one
(server/store/redis.py) is shared by every replica. `TokenBucket` paces one stream.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque


class RateCounter(ABC):
    """Counts events per name; blocking (Redis), so async code calls it in a thread."""

    @abstractmethod
    def hit(self, name: str, limit: int, window_s: float) -> float | None:
        """Count one event of `name`; None while at most `limit` happened in the window,
        otherwise the seconds until the next one is allowed (the event is not counted)."""


class MemoryRateCounter(RateCounter):
    """Sliding window in this process."""

    def __init__(self) -> None:
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, name: str, limit: int, window_s: float) -> float | None:
        now = time.monotonic()
        with self._lock:
            events = self._events.setdefault(name, deque())
            while events and events[0] <= now - window_s:
                events.popleft()
            if len(events) >= limit:
                return max(events[0] + window_s - now, 0.001)
            events.append(now)
            # forget names that went quiet, so the table stays small
            if len(self._events) > 10_000:
                stale = [k for k, v in self._events.items() if not v or v[-1] <= now - window_s]
                for key in stale:
                    del self._events[key]
            return None


class TokenBucket:
    """`rate` events per second on average, `burst` at once; `take()` says whether one more
    event fits. Time comes from the caller's clock so tests need not sleep."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
