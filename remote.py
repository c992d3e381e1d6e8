"""Files named by local path or fsspec URL (``http://``, ``s3://``, ``memory://``, ...).

One home for what data sources and the cache reader both need: telling a URL from a path,
a file's *stamp* (what identifies this version of it: size and modification time, or size
and the store's ETag), and ranged reads. Local files keep using ``os`` directly; a URL is
read through a synchronous fsspec filesystem made once per process (DataLoader workers
fork: fsspec's instance cache starts afresh in a new process).

Transient remote faults are retried here (issue 21, item 1): the async fsspec filesystems of
``http``/``https`` (and ``s3``/``gs``, when installed) are registered with
:class:`RetryingFileSystem` mixed in, so every request - ours, zarr-python's and the sample
index's - retries resets, timeouts, HTTP 408/429/5xx and cut bodies with exponential backoff
and jitter within :class:`RetryPolicy`'s bound; permanent answers (404, 403, ...) fail at once.
A store that stays silent past the bound raises :class:`RemoteUnreachable` (one line: the
store is unreachable, not damaged). Bytes that fail a check a fresh read may pass (a short
body, a crc32c mismatch) are re-read with :func:`reread`. Every retry is counted per process
by kind (:func:`retry_counts`, :func:`take_retries`).
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from .errors import HgkdError

T = TypeVar("T")

# Fields fsspec filesystems report that change when an object is rewritten, best first.
_VERSION_FIELDS = ("ETag", "etag", "Last-Modified", "LastModified", "last_modified", "mtime", "updated",
                   "generation", "created")

ENV_RETRIES, ENV_RETRY_SECONDS, ENV_TIMEOUT = "HGKD_REMOTE_RETRIES", "HGKD_REMOTE_RETRY_SECONDS", "HGKD_REMOTE_TIMEOUT"


# ---- the bound --------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How long a remote read keeps trying (issue 21): at most ``retries`` retries after the
    first try and ``seconds`` in all; one request gives up after ``timeout`` s (a stall).
    Backoff: ``base * 2**n`` capped at ``cap``, times a random factor in [0.5, 1] (jitter)."""

    retries: int = 8
    seconds: float = 120.0
    timeout: float = 60.0
    base: float = 0.2
    cap: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.seconds < 0 or self.timeout <= 0:
            raise HgkdError(f"remote retries {self.retries} / {self.seconds} s / timeout {self.timeout} s: "
                            f"retries and seconds must be >= 0, the timeout > 0 (--remote-retries, "
                            f"--remote-retry-seconds, ${ENV_RETRIES}, ${ENV_RETRY_SECONDS}, ${ENV_TIMEOUT})")

    @classmethod
    def from_env(cls, retries: int | None = None, seconds: float | None = None) -> "RetryPolicy":
        """Given values, else ``$HGKD_REMOTE_RETRIES`` / ``$HGKD_REMOTE_RETRY_SECONDS`` /
        ``$HGKD_REMOTE_TIMEOUT``, else the defaults."""
        def env(name: str, kind: type, default: Any) -> Any:
            raw = os.environ.get(name, "").strip()
            try:
                return kind(raw) if raw else default
            except ValueError:
                raise HgkdError(f"${name}={raw!r}: expected a number") from None

        return cls(retries=retries if retries is not None else env(ENV_RETRIES, int, cls.retries),
                   seconds=seconds if seconds is not None else env(ENV_RETRY_SECONDS, float, cls.seconds),
                   timeout=env(ENV_TIMEOUT, float, cls.timeout))

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry ``retry`` (0-based)."""
        return min(self.cap, self.base * 2 ** retry) * random.uniform(0.5, 1.0)

    def allows(self, retry: int, started: float, wait: float) -> bool:
        """Whether retry ``retry`` (0-based), made after ``wait`` seconds, is still inside the bound."""
        return retry < self.retries and time.monotonic() - started + wait <= self.seconds


_policy: RetryPolicy | None = None  # set by configure(); None: read the environment each time


def configure(retries: int | None = None, seconds: float | None = None) -> RetryPolicy:
    """Set this process's policy (CLI options; None: the environment or the default). Forked
    DataLoader workers inherit it."""
    global _policy
    _policy = RetryPolicy.from_env(retries, seconds)
    return _policy


def policy() -> RetryPolicy:
    return _policy if _policy is not None else RetryPolicy.from_env()


# ---- counting ---------------------------------------------------------------------------
_count_lock = threading.Lock()
_counts: dict[str, Any] = {"pid": -1, "by_kind": Counter(), "taken": 0}


def _own_counts() -> dict[str, Any]:
    if _counts["pid"] != os.getpid():  # a forked worker counts its own retries from zero
        _counts.update(pid=os.getpid(), by_kind=Counter(), taken=0)
    return _counts


def count_retry(kind: str) -> None:
    with _count_lock:
        _own_counts()["by_kind"][kind] += 1


def retry_counts() -> dict[str, int]:
    """Retries made by this process so far, by kind (``reset``, ``timeout``, ``http_503``, ...)."""
    with _count_lock:
        return dict(_own_counts()["by_kind"])


def take_retries() -> int:
    """Retries made by this process since the last call (what a batch carries to the trainer)."""
    with _count_lock:
        counts = _own_counts()
        total = sum(counts["by_kind"].values())
        new, counts["taken"] = total - counts["taken"], total
        return new


# ---- telling transient from permanent ---------------------------------------------------
class RemoteUnreachable(HgkdError):
    """A store that kept failing transiently past the retry bound: unreachable, not damaged."""


_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}


def transient_kind(err: BaseException) -> str | None:
    """The retry kind of a transient fault (``reset``, ``timeout``, ``http_503``, ``truncated``,
    ...), or None for a permanent answer (404, 403, a bad request, a local error)."""
    if isinstance(err, FileNotFoundError):  # fsspec's HTTP info() turns every failure into one
        cause = err.__cause__
        return transient_kind(cause) if cause is not None and not isinstance(cause, FileNotFoundError) else None
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        aiohttp = None
    if aiohttp is not None:
        if isinstance(err, aiohttp.ClientResponseError):
            status = int(err.status or 0)
            return f"http_{status}" if status in (408, 425, 429) or status >= 500 else None
        if isinstance(err, aiohttp.ClientPayloadError):
            return "truncated"
        if isinstance(err, aiohttp.ServerTimeoutError):
            return "timeout"
        if isinstance(err, aiohttp.ServerDisconnectedError):
            return "disconnect"
        if isinstance(err, aiohttp.ClientConnectorError):
            return "connect"
        if isinstance(err, aiohttp.ClientConnectionError):
            return "reset"
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(err, ConnectionError) or (isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS):
        return "reset"
    return None


def _unreachable(url: str, tries: int, started: float, kind: str, err: BaseException) -> RemoteUnreachable:
    return RemoteUnreachable(
        f"{url}: the store is unreachable - {tries} tries in {time.monotonic() - started:.1f} s failed (last: "
        f"{kind}, {type(err).__name__}: {err}); nothing read from it is damaged - check that the server is up "
        f"and the network, then run again (more patience: --remote-retries/--remote-retry-seconds or "
        f"${ENV_RETRIES}/${ENV_RETRY_SECONDS})")


def _next_wait(rules: RetryPolicy, retry: int, started: float, kind: str,
               give_up: Callable[[], BaseException]) -> float:
    """Retry ``retry`` of a ``kind`` fault, counted: the seconds to wait before it (one jittered
    draw, the one the bound is judged on); past the policy's bound, ``give_up()`` is raised."""
    wait = rules.backoff(retry)
    if not rules.allows(retry, started, wait):
        raise give_up() from None
    count_retry(kind)
    return wait


def _backoff_or_raise(rules: RetryPolicy, retry: int, started: float, url: str, err: Exception) -> float | None:
    """The wait before the next try of a transient fault (counted), None when ``err`` is not
    transient (the caller re-raises it); past the policy's bound, :class:`RemoteUnreachable`."""
    kind = transient_kind(err)
    if kind is None:
        return None
    return _next_wait(rules, retry, started, kind, lambda: _unreachable(url, retry + 1, started, kind, err))


async def retry_async(attempt: Callable[[], Awaitable[T]], url: str) -> T:
    """``await attempt()``, retried on transient faults within the policy; each try limited to
    the policy's timeout."""
    rules, started = policy(), time.monotonic()
    for retry in range(rules.retries + 1):
        try:
            return await asyncio.wait_for(attempt(), rules.timeout)
        except RemoteUnreachable:
            raise
        except Exception as err:
            delay = _backoff_or_raise(rules, retry, started, url, err)
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def retry_sync(attempt: Callable[[], T], url: str) -> T:
    """``attempt()``, retried on transient faults within the policy (for reads fsspec's
    filesystem methods do not cover, e.g. file objects' read-ahead)."""
    rules, started = policy(), time.monotonic()
    for retry in range(rules.retries + 1):
        try:
            return attempt()
        except RemoteUnreachable:
            raise
        except Exception as err:
            delay = _backoff_or_raise(rules, retry, started, url, err)
            if delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class Reread(Exception):
    """Bytes that failed a check a fresh read may pass: ``kind`` (``short_read``, ``crc``) and
    the error to report when every re-read fails too (then the stored bytes are bad)."""

    def __init__(self, kind: str, error: BaseException) -> None:
        super().__init__(kind, error)
        self.kind, self.error = kind, error


def reread(attempt: Callable[[], T]) -> T:
    """``attempt()`` (which reads and checks) again while it raises :class:`Reread`, within the
    policy; past the bound the last failed check's error is raised (never its bytes used)."""
    rules, started = policy(), time.monotonic()
    for retry in range(rules.retries + 1):
        try:
            return attempt()
        except Reread as bad:
            time.sleep(_next_wait(rules, retry, started, bad.kind, lambda: bad.error))
    raise AssertionError("unreachable")  # pragma: no cover


# ---- fsspec filesystems with retries ----------------------------------------------------
class RetryingFileSystem:
    """Mixin for an async fsspec filesystem: requests retried by :func:`retry_async`. Covers
    ``cat_file`` (and so ``cat_ranges``, range by range), ``info``/``size`` and ``ls``."""

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        call = super()._cat_file
        return await retry_async(lambda: call(path, start=start, end=end, **kwargs), self.unstrip_protocol(path))

    async def _info(self, path, **kwargs):
        call = super()._info
        return await retry_async(lambda: call(path, **kwargs), self.unstrip_protocol(path))

    async def _ls(self, path, detail=True, **kwargs):
        call = super()._ls
        return await retry_async(lambda: call(path, detail=detail, **kwargs), self.unstrip_protocol(path))


_WRAPPED: dict[str, str] = {}  # protocol -> the original implementation's "module.Class"


def __getattr__(name: str) -> Any:
    """``Retrying_<protocol>``: the registered retrying class of that protocol, made on first use
    (fsspec imports registered implementations lazily by name)."""
    if name.startswith("Retrying_") and name[len("Retrying_"):] in _WRAPPED:
        import importlib

        module, _, cls_name = _WRAPPED[name[len("Retrying_"):]].rpartition(".")
        base = getattr(importlib.import_module(module), cls_name)
        cls = type(name, (RetryingFileSystem, base), {"__module__": __name__})  # pickled by this name
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _install_retries(protocols: tuple[str, ...] = ("http", "https", "s3", "s3a", "gs", "gcs")) -> None:
    from fsspec.registry import known_implementations, register_implementation, registry

    for proto in protocols:
        spec = known_implementations.get(proto, {}).get("class", "")
        if not spec or spec.startswith(__name__) or proto in registry:
            continue
        _WRAPPED[proto] = spec
        register_implementation(proto, f"{__name__}.Retrying_{proto}", clobber=True,
                                errtxt=known_implementations[proto].get("err"))


_install_retries()


# ---- paths, stamps and ranged reads -----------------------------------------------------
def is_url(path: str) -> bool:
    """Read through fsspec (``file://`` too: a URL is never taken for a local path)."""
    return "://" in path


def url_fs(url: str, **storage_options: Any) -> tuple[Any, str]:
    """(synchronous fsspec filesystem, path inside it) of ``url``; one line when fsspec cannot."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as err:
        raise HgkdError(f"{url}: no fsspec filesystem for this URL ({type(err).__name__}: {err}); "
                        f"install the fsspec backend for it (e.g. s3fs, gcsfs, aiohttp)") from None


def remote_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning 'the store did not answer or has no such object' (network, HTTP status)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def describe_remote_error(url: str, err: BaseException) -> str:
    """One line for a permanent answer of a store (after retries, only those are left)."""
    status = getattr(err.__cause__, "status", None) or getattr(err, "status", None)
    if isinstance(err, FileNotFoundError) and status in (None, 404, 410):
        return f"{url}: no such file on the store (HTTP {status or 404}: not found); check the URL"
    if status in (401, 403):
        return (f"{url}: the store refused access (HTTP {status}); check the URL and your credentials "
                f"(fsspec storage options or the environment)")
    return f"{url}: cannot read it ({type(err).__name__}: {err}); check the URL and the network"


def stamp(path: str) -> list:
    """What identifies this version of a file: ``[size, mtime_ns, inode]`` locally, ``[size,
    version]`` for a URL (the store's ETag or modification time when it reports one)."""
    if not is_url(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns, st.st_ino]
    fs, inner = url_fs(path)
    try:
        info = fs.info(inner)
    except remote_errors() as err:
        raise HgkdError(describe_remote_error(path, err)) from None
    if info.get("type") == "directory":
        raise HgkdError(f"{path}: a directory, not a file")
    version = next((str(info[f]) for f in _VERSION_FIELDS if info.get(f) is not None), "")
    return [int(info.get("size") or -1), version]


def _short(url: str, offset: int, size: int, got: int) -> Reread:
    return Reread("short_read", HgkdError(
        f"{url}: bytes {offset}-{offset + size - 1} came back short ({got} of {size} bytes) on every try; the "
        f"file changed or is truncated on the store - restart to index it again"))


class RangeReader:
    """Ranged reads of URLs through fsspec, filesystems kept per process. A range that comes
    back short is read again (:func:`reread`), never returned."""

    def __init__(self) -> None:
        self._fs: dict[str, tuple[Any, str]] = {}
        self._pid = os.getpid()

    def _resolve(self, url: str) -> tuple[Any, str]:
        if self._pid != os.getpid():
            self._fs, self._pid = {}, os.getpid()
        hit = self._fs.get(url)
        if hit is None:
            hit = self._fs[url] = url_fs(url)
        return hit

    def read(self, url: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (``size < 0``: the whole file); one line when unreachable."""
        fs, inner = self._resolve(url)

        def attempt() -> bytes:
            if size < 0:
                return fs.cat_file(inner)
            data = fs.cat_file(inner, start=offset, end=offset + size)
            if len(data) != size:
                raise _short(url, offset, size, len(data))
            return data

        try:
            return reread(attempt)
        except remote_errors() as err:
            raise HgkdError(describe_remote_error(url, err)) from None

    def read_many(self, url: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, size)`` ranges of one file, fetched concurrently where the store
        can; ranges that come back short are fetched again."""
        fs, inner = self._resolve(url)
        out: list[bytes | None] = [None] * len(ranges)

        def attempt() -> list[bytes]:
            todo = [i for i, data in enumerate(out) if data is None]
            got = fs.cat_ranges([inner] * len(todo), [ranges[i][0] for i in todo],
                                [ranges[i][0] + ranges[i][1] for i in todo], on_error="raise")
            short = None
            for i, data in zip(todo, got):
                if len(data) == ranges[i][1]:
                    out[i] = data
                else:
                    short = short or _short(url, ranges[i][0], ranges[i][1], len(data))
            if short is not None:
                raise short
            return out  # type: ignore[return-value]

        try:
            return reread(attempt)
        except remote_errors() as err:
            raise HgkdError(describe_remote_error(url, err)) from None

    def __getstate__(self) -> dict:
        return {"_fs": {}, "_pid": -1}
