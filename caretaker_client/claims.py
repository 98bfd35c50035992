"""Claim work items in Redis so that caretaker can give back the ones a dead worker held.

An app that has an item's id, in two lines::

    from caretaker_client.claims import claim
    with claim(item_id):      # registers the claim, keeps its heartbeat fresh, completes it on exit
        handle(item_id)

A worker that takes its items from the queue (pop and claim in one atomic step, so a
worker killed in between loses nothing)::

    from caretaker_client.claims import take
    while True:
        job = take(timeout=5)         # None when the queue stayed empty (or Redis is unreachable)
        if job is not None:
            with job:
                handle(job.item_id)

The layout (:class:`Layout`) is the one caretaker's ``claims:`` configuration assumes
by default, so ``claims: {port: 6379}`` watches it::

    processing_issues   SET     ids of the items being worked on
    issue:{id}          HASH    status=processing, processId, pid, host, startTime (ISO 8601, UTC)
    heartbeat:{owner}   STRING  with a TTL (30 min), refreshed from a daemon thread
    task_queue          LIST    producers LPUSH, workers (take) RPOP; released items are RPUSHed

The owner (``processId``) is unique to the process (host name, pid and a random part),
so a later process that gets the same pid never keeps a dead one's claims alive.

**On exit** without an exception the claim is *completed*: the id leaves the claimed
set and ``status`` becomes ``done``. An exception means the work was not done: by
default (``on_error="release"``) the claim is released as caretaker would release it
(claim fields deleted, ``status=queued``, the id pushed back to the queue), so another
worker tries again; ``on_error="fail"`` sets ``status=failed`` and takes it out of the
claimed set without queueing it again (an item that fails every time would otherwise
go round forever). ``KeyboardInterrupt`` and ``SystemExit`` (the process is being
stopped) always release. The exception is raised again either way. Completing or
releasing happens only if the claim is still this one (same owner, same claim time): if
caretaker released it meanwhile (its heartbeat lapsed) and another worker, or another
thread of this process (threads share the owner id; claim times, to the microsecond,
are never the same twice in a process), took it, this one leaves it alone and logs a
warning.

**Never hurting the app**: Redis errors, and a URL redis-py cannot read, are logged,
never raised into the app's work (a claim that cannot be registered lets the work go
ahead untracked; ``take()`` returns ``None``).

**Nothing left claimed behind the app's back**: a claim Redis holds for this live process
stays ``active`` for caretaker (its pid runs), so what Redis must still be told is told
by the process's background thread, again and again (every 0.5 s doubling to 30 s) until
Redis answers: the end of a claim that failed (Redis restarting, unreachable); the end of
a claim whose registration was sent but not answered (Redis may have applied it: the
end is checked against this claim's owner and claim time, so it changes nothing if it
did not); and a ``take()`` whose answer was lost after Redis ran it: the thread looks
for the claim with this process's owner and that take's claim time (unique in the
process) in the claimed set (``SSCAN``, pipelined ``HMGET``) and releases it to the
queue, as the app never saw it. No key is added to the layout for this. A command that
certainly never reached Redis (the connection was refused) changed nothing and is not
retried. The default
client gives every command 2 s and no retry, so a Redis that does not answer costs 2 s
when a claim is registered and 2 s when it ends; the heartbeat is refreshed from one
daemon thread per process (which ends when no claim has been open for 10 s), so the work
itself never waits for Redis.

Redis: ``redis=`` a redis-py client, else the URL in ``CARETAKER_CLAIMS_REDIS_URL``
(``redis://[:password@]host:port/db``, ``rediss://`` for TLS), else
``redis://127.0.0.1:6379/0``. The scripts name keys they build from the layout, so a
Redis Cluster is not supported. Needs redis-py only (imported on first use); nothing of
caretaker's ``exporter`` or ``receiver``.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import redis

__all__ = ["DEFAULT_URL", "ENV_URL", "Claim", "Layout", "claim", "owner_id", "pending", "take"]

log = logging.getLogger(__name__)

ENV_URL = "CARETAKER_CLAIMS_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_HEARTBEAT_TTL = 1800.0
COMMAND_TIMEOUT = 2.0
MAX_REFRESH_INTERVAL = 60.0
KEEPER_IDLE_SECONDS = 10.0
"""The background thread ends when it has had nothing to do for this long (seconds)."""
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
"""Seconds before the first retry of a failed finish, doubling up to the second."""
MAX_PENDING = 10_000
"""Retries kept at most; beyond, the oldest is dropped (logged): its claim stays until the
process exits, and caretaker then releases it."""


@dataclass(frozen=True)
class Layout:
    """Where claims live: caretaker's ``claims:`` defaults (give the same names there)."""

    claimed_key: str = "processing_issues"
    item_key: str = "issue:{id}"
    owner_field: str = "processId"
    pid_field: str = "pid"
    host_field: str = "host"
    time_field: str = "startTime"
    status_field: str = "status"
    heartbeat_key: str = "heartbeat:{owner}"
    queue_key: str = "task_queue"

    def item(self, item_id: str) -> str:
        return self.item_key.replace("{id}", item_id)

    def heartbeat(self, owner: str, item_id: str) -> str:
        return self.heartbeat_key.replace("{owner}", owner).replace("{id}", item_id)


DEFAULT_LAYOUT = Layout()

# Keys are built in the scripts from the layout's patterns (plain text replacement).
_LUA_KEYS = """
local function plain(s, pattern, value)
  local i, j = string.find(s, pattern, 1, true)
  while i do
    s = string.sub(s, 1, i - 1) .. value .. string.sub(s, j + 1)
    i, j = string.find(s, pattern, i + #value, true)
  end
  return s
end
"""
# KEYS[1] claimed set, KEYS[2] queue. ARGV: item pattern, heartbeat pattern, ttl ms, then the
# item's field/value pairs, the owner's first (ARGV[5] is the owner). Returns the id taken,
# false when the queue is empty, or an error (nothing changed) when a key has the wrong type:
# every check comes before the first write (RPOP included), since a failing command in a
# script does not undo the writes before it.
_TAKE = _LUA_KEYS + """
local claimed = redis.call("TYPE", KEYS[1]).ok
if claimed ~= "set" and claimed ~= "none" then return redis.error_reply("WRONGTYPE " .. KEYS[1] .. " is not a set") end
local id = redis.call("LINDEX", KEYS[2], -1)
if not id then return false end
local item = plain(ARGV[1], "{id}", id)
local kind = redis.call("TYPE", item).ok
if kind ~= "hash" and kind ~= "none" then return redis.error_reply("WRONGTYPE " .. item .. " is not a hash") end
redis.call("RPOP", KEYS[2])
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call("SADD", KEYS[1], id)
redis.call("HSET", item, unpack(fields))
redis.call("SET", plain(plain(ARGV[2], "{owner}", ARGV[5]), "{id}", id), ARGV[5], "PX", ARGV[3])
return id
"""
# KEYS[1] claimed set, KEYS[2] item, KEYS[3] queue. ARGV: id, owner field, owner, mode, status
# field, claim time field, claim time, then the claim fields to delete on release. Returns 1
# when done, 0 when the claim is no longer this one (another owner, or another claim of this
# process: threads share the owner id, the claim time tells their claims apart), -1 when the
# queue is not a list (nothing changed). Every check comes before the first write: a command
# that fails in a script does not undo the writes before it, so a failing RPUSH after SREM
# would lose the job.
_FINISH = """
if redis.call("SISMEMBER", KEYS[1], ARGV[1]) == 0 or redis.call("TYPE", KEYS[2]).ok ~= "hash"
    or redis.call("HGET", KEYS[2], ARGV[2]) ~= ARGV[3] or redis.call("HGET", KEYS[2], ARGV[6]) ~= ARGV[7] then
  return 0
end
if ARGV[4] == "release" then
  local queue = redis.call("TYPE", KEYS[3]).ok
  if queue ~= "list" and queue ~= "none" then return -1 end
end
redis.call("SREM", KEYS[1], ARGV[1])
if ARGV[4] == "release" then
  for i = 8, #ARGV do redis.call("HDEL", KEYS[2], ARGV[i]) end
  redis.call("HSET", KEYS[2], ARGV[5], "queued")
  redis.call("RPUSH", KEYS[3], ARGV[1])
else
  redis.call("HSET", KEYS[2], ARGV[5], ARGV[4])
end
return 1
"""

@dataclass
class _Process:
    """What one process shares between its claims; a forked child starts afresh."""

    owner: str
    clients: dict[str, Any] = field(default_factory=dict)
    keeper: _Keeper | None = None


_process: dict[int, _Process] = {}
_lock = threading.Lock()


def _forget_parent() -> None:
    global _lock, _time_lock  # noqa: PLW0603 - a lock held by a thread of the parent would never be released in the child
    _lock = threading.Lock()
    _time_lock = threading.Lock()
    _process.clear()


os.register_at_fork(after_in_child=_forget_parent)


def _here() -> _Process:
    pid = os.getpid()
    with _lock:
        state = _process.get(pid)
        if state is None:
            state = _process[pid] = _Process(f"{socket.gethostname()}-{pid}-{secrets.token_hex(3)}")
        return state


def owner_id() -> str:
    """This process's owner id: ``host-pid-random``, new in a forked child."""
    return _here().owner


def _default_client() -> redis.Redis:
    """One client per process and URL: a 2 s timeout per command, no retries, so that a
    Redis that does not answer costs the app 2 s at most per claim it registers or ends."""
    import redis  # noqa: PLC0415 - the package is importable without redis-py until a claim is made
    from redis.backoff import NoBackoff  # noqa: PLC0415
    from redis.retry import Retry  # noqa: PLC0415

    state = _here()
    url = os.environ.get(ENV_URL) or DEFAULT_URL
    with _lock:
        if url not in state.clients:
            state.clients[url] = redis.Redis.from_url(url, socket_timeout=COMMAND_TIMEOUT,
                                                      socket_connect_timeout=COMMAND_TIMEOUT,
                                                      retry=Retry(NoBackoff(), 0))
        client: redis.Redis = state.clients[url]
        return client


_last_claim_us = 0
_time_lock = threading.Lock()


def _claim_time() -> str:
    """Now in ISO 8601, UTC, to the microsecond, and never the same twice in a process: the
    claim time tells this process's claims of one item apart (its threads share the owner
    id), so that one thread's end never completes another's claim."""
    global _last_claim_us  # noqa: PLW0603 - one sequence per process
    with _time_lock:
        us = _last_claim_us = max(time.time_ns() // 1000, _last_claim_us + 1)
    when = datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Retry:
    """Something Redis must still be told, tried again until it answers."""

    what: str
    """For the log: ``mark 17 done``."""
    client: int
    """``id()`` of the redis-py client it uses: one Redis that does not answer holds up
    only its own retries."""
    run: Callable[[], str]
    """Tells Redis; returns what came of it (for the log); raises when Redis did not answer."""
    due: float = 0.0
    """``time.monotonic()`` of the next try."""
    delay: float = RETRY_FIRST
    tries: int = 0


class _Keeper:
    """The process's one daemon thread for its claims: refreshes the heartbeat keys of the
    open ones every third of the shortest TTL (at most every minute), through each claim's
    client, and tries again what Redis must still be told (:class:`_Retry`: a claim whose
    end failed; a take or a registration whose answer was lost), every
    :data:`RETRY_FIRST` seconds doubling to :data:`RETRY_MAX`, until Redis answers.

    The thread starts with the first claim and ends when it has had nothing to do for
    :data:`KEEPER_IDLE_SECONDS`, so an app that makes a client per job has one thread, and
    a client is held only while a claim of it is open or a retry needs it."""

    def __init__(self) -> None:
        self.beats: dict[tuple[int, str], tuple[Any, Counter[float]]] = {}
        """``(id(client), key)``: the client and the TTLs of the open claims that keep the key."""
        self.retries: deque[_Retry] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.next_refresh = 0.0

    def _start(self) -> None:
        """Start the thread unless it runs (the lock held)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="caretaker-claims-heartbeat", daemon=True)
            self.thread.start()

    def add(self, client: redis.Redis, key: str, ttl: float) -> None:
        with self.lock:
            self.beats.setdefault((id(client), key), (client, Counter()))[1][ttl] += 1
            self.next_refresh = 0.0  # refresh now: the new claim's TTL may be the shortest
            self._start()
        self.wake.set()

    def remove(self, client: redis.Redis, key: str, ttl: float) -> None:
        with self.lock:
            entry = self.beats.get((id(client), key))
            if entry is not None:
                counts = entry[1]
                counts[ttl] -= 1
                if counts[ttl] <= 0:
                    del counts[ttl]
                if not counts:
                    del self.beats[(id(client), key)]

    def retry(self, what: str, client: redis.Redis, run: Callable[[], str]) -> None:
        """Try ``run`` (which uses ``client``) again later, until Redis answers."""
        with self.lock:
            if len(self.retries) >= MAX_PENDING:
                dropped = self.retries.popleft()
                log.error("caretaker claims: %d retries pending; giving up on: %s (its claim stays until this "
                          "process exits; caretaker then releases it)", MAX_PENDING, dropped.what)
            self.retries.append(_Retry(what, id(client), run, time.monotonic() + RETRY_FIRST))
            self._start()
        self.wake.set()

    def pending(self) -> int:
        with self.lock:
            return len(self.retries)

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            self.wake.clear()  # before reading the keys: a claim added after this wakes the wait below
            now = time.monotonic()
            with self.lock:
                if self.beats or self.retries:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= KEEPER_IDLE_SECONDS:
                    self.thread = None  # add() and retry() start another from now on
                    return
                refresh = bool(self.beats) and now >= self.next_refresh
            if refresh:
                ttls = self._refresh()  # holds no client while it waits: a claim's end may be a client's last use
                with self.lock:
                    self.next_refresh = now + min([MAX_REFRESH_INTERVAL, *(ttl / 3 for ttl in ttls)])
            self._retry_due()
            with self.lock:
                wakes = [r.due for r in self.retries] + ([self.next_refresh] if self.beats else [])
            self.wake.wait(max(0.0, min(wakes) - time.monotonic()) if wakes else KEEPER_IDLE_SECONDS)

    def _refresh(self) -> list[float]:
        """Set every heartbeat key again; the TTLs (seconds) it used."""
        with self.lock:
            beats = [(client, key, min(counts)) for (_, key), (client, counts) in self.beats.items()]
        for client, key, ttl in beats:
            try:
                client.set(key, str(int(time.time())), px=int(ttl * 1000))
            except Exception as err:  # never into the app; the next round tries again
                log.warning("caretaker claims: heartbeat %s not refreshed: %s", key, err)
        return [ttl for _, _, ttl in beats]

    def _retry_due(self) -> None:
        """Each retry that is due, once; when one fails, its client's Redis is not
        answering, and every other retry of that client waits as long as it does (a
        Redis that does not answer costs one command timeout per try, however many
        retries it has pending; the heartbeats are refreshed between rounds)."""
        now = time.monotonic()
        with self.lock:
            due = [r for r in self.retries if r.due <= now]
        failed: set[int] = set()  # id(client) of the clients whose Redis did not answer this round
        for item in due:
            if item.client in failed:
                continue
            item.tries += 1
            try:
                outcome = item.run()
            except Exception as err:
                again = time.monotonic() + item.delay
                failed.add(item.client)
                with self.lock:
                    for other in self.retries:
                        if other.client == item.client:
                            other.due = max(other.due, again)
                log.debug("caretaker claims: %s failed again (try %d, next in %.1fs): %s", item.what, item.tries,
                          item.delay, err)
                item.delay = min(RETRY_MAX, item.delay * 2)
                continue
            with self.lock:
                self.retries.remove(item)
            log.info("caretaker claims: %s: %s (after %d tries)", item.what, outcome, item.tries)


def pending() -> int:
    """How many things this process must still tell Redis (claims whose end failed, takes
    or registrations whose answer was lost): the background thread retries them."""
    return _keeper().pending()


def _keeper() -> _Keeper:
    state = _here()
    with _lock:
        if state.keeper is None:
            state.keeper = _Keeper()
        return state.keeper


class Claim:
    """A claim on one item (a context manager): :func:`claim` and :func:`take` make them.

    ``registered`` says whether Redis holds it (False when Redis could not be reached:
    the work goes ahead untracked)."""

    def __init__(self, item_id: str, redis: redis.Redis | None = None, layout: Layout = DEFAULT_LAYOUT,
                 heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL, on_error: Literal["release", "fail"] = "release",
                 fields: dict[str, str] | None = None, owner: str | None = None) -> None:
        if heartbeat_ttl <= 0:
            raise ValueError("heartbeat_ttl must be more than 0 seconds")
        self.item_id = item_id
        self._client = redis
        self.layout = layout
        self.heartbeat_ttl = heartbeat_ttl
        self.on_error = on_error
        self.fields = dict(fields or {})
        self.owner = owner or owner_id()
        self.claim_time: str | None = None
        """The claim time this claim wrote (``claim_fields``), unique in the process."""
        self.registered = False
        self.unsure = False
        """The registration failed after it was sent (its answer was lost): Redis may hold
        the claim. The work goes ahead as if untracked; its end is still told to Redis."""
        self.result: str | None = None
        """After exit: ``done``, ``released``, ``failed``, ``lost`` (no longer ours), or
        ``error`` (Redis failed: the background thread tries again until Redis answers);
        ``None`` for a claim that was never registered."""

    @property
    def client(self) -> redis.Redis:
        """The redis-py client: the one given, else the process's for ``CARETAKER_CLAIMS_REDIS_URL``,
        made on first use. Raises ``ValueError`` for a URL redis-py cannot read: only ever
        asked inside the guarded calls, so that never reaches the app."""
        if self._client is None:
            self._client = _default_client()
        return self._client

    @property
    def heartbeat_key(self) -> str:
        return self.layout.heartbeat(self.owner, self.item_id)

    def claim_fields(self) -> dict[str, str]:
        """The item's fields a claim sets, the owner's first, with a new claim time (kept as
        :attr:`claim_time`)."""
        lay = self.layout
        self.claim_time = _claim_time()
        return {lay.owner_field: self.owner, lay.status_field: "processing", lay.pid_field: str(os.getpid()),
                lay.host_field: socket.gethostname(), **self.fields, lay.time_field: self.claim_time}

    def register(self) -> bool:
        """SADD, HSET and the heartbeat in one transaction; False (logged) when Redis failed."""
        lay = self.layout
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.sadd(lay.claimed_key, self.item_id)
                fields: dict[Any, Any] = self.claim_fields()
                pipe.hset(lay.item(self.item_id), mapping=fields)
                pipe.set(self.heartbeat_key, str(int(time.time())), px=int(self.heartbeat_ttl * 1000))
                pipe.execute()
        except Exception as err:
            self.unsure = not _never_sent(err)
            log.warning("caretaker claims: could not claim %s, working on it untracked%s: %s", self.item_id,
                        " (Redis may hold the claim: its end will be told to Redis)" if self.unsure else "", err)
            return False
        self.registered = True
        return True

    def __enter__(self) -> Claim:
        if not self.registered:
            self.register()
        if self.registered or self.unsure:
            _keeper().add(self.client, self.heartbeat_key, self.heartbeat_ttl)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if not self.registered and not self.unsure:
            return False
        _keeper().remove(self.client, self.heartbeat_key, self.heartbeat_ttl)
        chosen = "done" if kind is None else self.on_error if issubclass(kind, Exception) else "release"
        mode = "failed" if chosen == "fail" else chosen
        if self.registered:
            self.result = self._finish(mode)
        else:  # unsure: Redis did not answer a moment ago; do not make the app wait for it again
            _keeper().retry(f"mark {self.item_id} {mode} (if its claim was registered)", self.client,
                            self._retrier(mode))
        return False  # an exception of the app's goes on

    def _finish(self, mode: str) -> str:
        """Tell Redis the claim ended (``done``, ``release``, ``failed``); the result. When
        Redis does not answer, the background thread tries again until it does."""
        try:
            return self._finish_once(mode)
        except Exception as err:
            log.warning("caretaker claims: could not mark %s %s (tried again in the background): %s",
                        self.item_id, mode, err)
            _keeper().retry(f"mark {self.item_id} {mode}", self.client, self._retrier(mode))
            return "error"

    def _retrier(self, mode: str) -> Callable[[], str]:
        return lambda: self._finish_once(mode, quiet=True)

    def _finish_once(self, mode: str, quiet: bool = False) -> str:
        """One try of :meth:`_finish`; raises when Redis does not answer. ``quiet``: a
        retry, for a claim the app may never have had (an unsure registration)."""
        lay = self.layout
        ours = self.client.eval(_FINISH, 3, lay.claimed_key, lay.item(self.item_id), lay.queue_key,
                                self.item_id, lay.owner_field, self.owner, mode, lay.status_field,
                                lay.time_field, self.claim_time or "",
                                lay.owner_field, lay.pid_field, lay.host_field, lay.time_field)
        if ours == -1:
            log.error("caretaker claims: %s not released: %s is not a list; the claim is left as it is, held by %s",
                      self.item_id, lay.queue_key, self.owner)
            return "error"
        if not ours:
            if not quiet:
                log.warning("caretaker claims: %s is no longer claimed by %s (released while its heartbeat "
                            "lapsed?); left as it is", self.item_id, self.owner)
            return "lost"
        return {"done": "done", "release": "released"}.get(mode, mode)


def claim(item_id: str, **options: Any) -> Claim:
    """A claim on ``item_id``, registered when the ``with`` block is entered; options
    as :class:`Claim` (``redis``, ``layout``, ``heartbeat_ttl`` seconds, ``on_error``,
    ``fields`` to set on the item, e.g. ``{"taskType": "summarize"}``)."""
    return Claim(item_id, **options)


def take(timeout: float = 5.0, poll: float = 0.2, **options: Any) -> Claim | None:
    """Pop an id from the queue's right end and claim it, atomically (a Lua script).

    Polls every ``poll`` seconds for up to ``timeout`` seconds; returns the registered
    :class:`Claim` (use it in ``with``), or ``None`` when the queue stayed empty or Redis
    could not be reached (logged). Options as :class:`Claim`."""
    deadline = time.monotonic() + timeout
    while True:
        job = Claim("", **options)
        lay = job.layout
        values = [v for pair in job.claim_fields().items() for v in pair]
        try:
            taken = job.client.eval(_TAKE, 2, lay.claimed_key, lay.queue_key, lay.item_key, lay.heartbeat_key,
                                    str(int(job.heartbeat_ttl * 1000)), *values)
        except Exception as err:
            lost = not _never_sent(err)
            log.warning("caretaker claims: could not take work from %s%s: %s", lay.queue_key,
                        " (if Redis took an item for this process, it is given back in the background)" if lost
                        else "", err)
            if lost:
                _keeper().retry(f"give back what a take of {job.owner} at {job.claim_time} may have claimed",
                                job.client, functools.partial(_give_back, job))
            return None
        if taken is not None:
            job.item_id = taken.decode() if isinstance(taken, bytes) else str(taken)
            job.registered = True
            return job
        if time.monotonic() + poll > deadline:
            return None
        time.sleep(poll)


def _never_sent(err: Exception) -> bool:
    """Whether a failed command certainly never reached Redis, so that it changed nothing:
    a client that could not be made (a bad URL), a connection that could not be opened
    (redis-py's ``Error N connecting to HOST:PORT``, ``Timeout connecting to server``), or
    Redis's own error answer. Anything else (a timeout waiting for the answer, a
    connection lost after sending) may have been applied."""
    from redis import exceptions as errors  # noqa: PLC0415 - imported with the client, on first use

    if isinstance(err, errors.ResponseError | errors.DataError | ValueError):
        return True  # Redis answered with an error, or redis-py refused to send it
    text = str(err)
    return (isinstance(err, errors.ConnectionError | errors.TimeoutError)
            and (" connecting to " in text or text.startswith("Timeout connecting")))


def _give_back(job: Claim) -> str:
    """After a take whose answer was lost: find the claim it may have made (this owner, this
    claim time: unique in the process) and release it to the queue, as the app never saw
    it. Raises when Redis does not answer (the keeper tries again)."""
    lay = job.layout
    owner, when = job.owner.encode(), (job.claim_time or "").encode()
    cursor = 0
    while True:  # ends: SSCAN's cursor comes back to 0
        cursor, found = job.client.sscan(lay.claimed_key, cursor, count=500)
        ids = [_bytes(i) for i in found]  # a client may decode its answers, or not
        if ids:
            with job.client.pipeline(transaction=False) as pipe:
                for raw in ids:
                    pipe.hmget(lay.item_key.encode().replace(b"{id}", raw), [lay.owner_field, lay.time_field])
                rows = pipe.execute(raise_on_error=False)
            for raw, row in zip(ids, rows, strict=True):
                if isinstance(row, list) and [_bytes(v) for v in row] == [owner, when]:
                    job.item_id = raw.decode("utf-8", "replace")
                    return f"{job.item_id} released: {job._finish_once('release', quiet=True)}"
        if int(cursor) == 0:
            return "it had claimed nothing"


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else b"" if value is None else str(value).encode()
