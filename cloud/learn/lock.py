"""One learning round per fleet and profile at a time: a lock in Redis."""

from __future__ import annotations

import logging
import threading
import uuid

import redis

log = logging.getLogger(__name__)


class RoundLock:
    """One round per fleet and profile: a Redis key set only if absent (SET NX) with a
    short expiry that the holder renews while it works. A worker that dies holding it
    blocks the next round for ``ttl_s`` at most; only the holder can renew or release it
    (compare-and-act in one Lua call)."""

    _RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
        "return 0"
    )
    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    )

    def __init__(self, client: redis.Redis, fleet: str, profile: str, *, ttl_s: int = 60) -> None:
        self.client = client
        self.key = f"edgeloop:round:{fleet}:{profile}"
        self.token = uuid.uuid4().hex
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock and keep renewing it from a thread until release()."""
        if not self.client.set(self.key, self.token, nx=True, ex=self.ttl_s):
            return False
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True)
        self._renewer.start()
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.client.eval(self._RENEW, 1, self.key, self.token, self.ttl_s)
            except redis.RedisError:  # Redis away for a moment: the next tick tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.client.eval(self._RELEASE, 1, self.key, self.token)
        except redis.RedisError as exc:  # the key expires by itself within ttl_s
            log.warning("round lock %s not released (%s); it expires in %d s", self.key, exc,
                        self.ttl_s)  # fmt: skip

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value
