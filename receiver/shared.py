"""State shared by several receivers through Redis (docs/design.md, "Many hosts").

With two Alertmanagers in HA mode each notifying its own receiver, or several hosts,
each alert must still be acted on once and each service repaired by one receiver at a
time, within one budget. Redis keys (``PREFIX`` is ``shared_state.key_prefix`` followed
by ``receiver.host`` and a colon, :func:`key_prefix`: ``caretaker:web-1:``):

- ``PREFIX alert:<fingerprint>:<startsAt>:<status>``: ``SET NX EX dedupe_ttl``; the
  receiver that sets it owns the alert.
- ``PREFIX lock:<service>``: ``SET NX PX`` with a random token while a repair runs,
  released only by its owner (compare-and-delete in Lua).
- ``PREFIX repairs:<service>``: a sorted set of repair start times (the budget).
- ``PREFIX finished:<service>``: when the last repair ended (the cooldown).
- ``PREFIX reset:<service>``: when the budget was last reset.

:class:`SharedState` is the Redis implementation of
:class:`~receiver.state.RepairState`. Every method raises :class:`SharedStateError`
when Redis cannot be reached; the receiver then repairs nothing (answering 503 so
Alertmanager retries).

The layout depends on the host alone, never on ``receiver.fleet``: the two receivers of
a pair must meet on the same keys whatever either's mode, and hosts that share one Redis
must not meet. Receivers before this layout kept their keys under ``PREFIX`` without
the host (outside fleet mode); :meth:`SharedState.legacy_repairs` finds their repairs.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from .payload import Alert, Decision
from .store import Store
from .vocabulary import Reason

__all__ = ["SharedState", "SharedStateError", "key_prefix"]

_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end
"""


class SharedStateError(Exception):
    """Redis could not be reached or answered with an error."""


def key_prefix(configured: str, host: str) -> str:
    """The prefix of every key of the receivers of ``host``: ``shared_state.key_prefix``,
    the host, a colon (``caretaker:`` and ``web-1``: ``caretaker:web-1:``). A contract:
    the receivers of a pair (each version of them) must compute the same."""
    return f"{configured}{host}:"


class SharedState:
    """:class:`~receiver.state.RepairState` shared through Redis by several receivers.

    ``prefix`` starts every key; an alert's claim lasts ``dedupe_ttl`` seconds. With
    ``store``, a budget reset is also written to this receiver's state file (its own
    record, as a lone receiver keeps it).

    A task cancelled while one of these calls waits for Redis may go on as if it had
    not been: redis-py's asyncio client (8.1) often loses the cancellation. Callers
    must not rely on it to stop (see :meth:`Executor.stop <receiver.executor.Executor.stop>`).
    """

    def __init__(self, client: aioredis.Redis, prefix: str, dedupe_ttl: float, store: Store | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.dedupe_ttl = int(dedupe_ttl)
        self.store = store

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def claim(self, alerts: Sequence[Alert], decisions: list[Decision]) -> list[Decision]:
        """Claim ``alert:<fingerprint>:<startsAt>:<status>`` for each alert that acts, in
        one pipeline; an alert another receiver claimed first becomes a ``duplicate``."""
        acting = [i for i, d in enumerate(decisions) if d.acts]
        if not acting:
            return decisions
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for i in acting:
                    alert = alerts[i]
                    pipe.set(self._k("alert", alert.fingerprint, alert.starts_at_key, alert.status), "1", nx=True,
                             ex=self.dedupe_ttl)
                claimed = await pipe.execute()
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err
        decisions = list(decisions)
        for i, mine in zip(acting, claimed, strict=True):
            if not mine:  # another receiver owns this alert
                decisions[i] = decisions[i]._replace(reason=Reason.DUPLICATE.value)
        return decisions

    async def acquire(self, service: str, lease_seconds: float) -> str | None:
        """A lock token if this receiver may repair ``service`` now, else None."""
        token = secrets.token_hex(16)
        try:
            ok = await self.client.set(self._k("lock", service), token, nx=True, px=int(lease_seconds * 1000))
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err
        return token if ok else None

    async def release(self, service: str, token: str) -> None:
        """Delete the lock only if it still holds ``token`` (compare-and-delete in Lua)."""
        try:
            await self.client.eval(_RELEASE, 1, self._k("lock", service), token)
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err

    async def record_start(self, service: str, started: float) -> None:
        """Add the start to ``repairs:<service>`` (member ``<started>-<random>``, score ``started``)."""
        try:
            await self.client.zadd(self._k("repairs", service), {f"{started:.6f}-{secrets.token_hex(4)}": started})
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err

    async def record_finish(self, service: str, finished: float) -> None:
        """Set ``finished:<service>`` to ``repr(finished)``."""
        try:
            await self.client.set(self._k("finished", service), repr(finished))
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err

    async def repairs_since(self, service: str, since: float) -> int:
        """``ZCOUNT repairs:<service>`` from ``max(since, reset:<service>)``."""
        try:
            reset = await self.client.get(self._k("reset", service))
            low = max(since, float(reset) if reset else 0.0)
            return int(await self.client.zcount(self._k("repairs", service), low, "+inf"))
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err

    async def last_finished(self, service: str) -> float | None:
        """``finished:<service>``, whichever receiver set it; None if never set, or if it
        is not later than ``reset:<service>`` (a reset makes the next attempt due at once)."""
        try:
            finished, reset = await self.client.mget(self._k("finished", service), self._k("reset", service))
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err
        if not finished or (reset and float(finished) <= float(reset)):
            return None
        return float(finished)

    async def legacy_repairs(self, legacy_prefix: str, services: Sequence[str], since: float) -> dict[str, int]:
        """Per service, how many repairs started after ``since`` (Unix seconds) are recorded
        under ``legacy_prefix`` (``<legacy_prefix>repairs:<service>``, one ZCOUNT each, in one
        pipeline): the repairs of receivers that keep their keys without the host, as
        receivers did before :func:`key_prefix` outside fleet mode. Those share no lock nor
        budget with this one."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for service in services:
                    pipe.zcount(f"{legacy_prefix}repairs:{service}", f"({since!r}", "+inf")
                counts = await pipe.execute()
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err
        return {service: int(n) for service, n in zip(services, counts, strict=True) if n}

    async def reset_budget(self, service: str, now: float, reason: str) -> None:
        """Write the reset to the state file (with ``store``), then set ``reset:<service>``
        to ``repr(now)``: the repairs of every receiver started before it stop counting."""
        if self.store is not None:
            self.store.reset_budget(service, now, reason)
        try:
            await self.client.set(self._k("reset", service), repr(now))
        except (redis_errors.RedisError, OSError) as err:
            raise SharedStateError(str(err)) from err
