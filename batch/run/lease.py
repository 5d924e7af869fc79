"""Per-slide leases: two runs on one OUT never process the same slide at once.

A lease is a small JSON object ``OUT/leases/<slide_id>.json`` (run id, host,
pid, expiry) created only if absent:

- locally with ``O_CREAT | O_EXCL`` (one creator wins, on any POSIX filesystem);
- on S3 with a conditional PUT (``If-None-Match: *``; S3 and MinIO answer 412 to
  the loser), and a stale lease is taken over with ``If-Match: <its ETag>``, so
  of two runs taking over one stale lease exactly one wins.

A lease is stale when it has expired (``ttl`` seconds after its last renewal:
the driver renews its leases while it runs) or when its holder ran on this host
and its process is gone (a killed driver's rerun need not wait for the expiry).
Stores that refuse conditional requests (``NotImplemented``) get a weaker
fallback: create when absent, then read back and keep the lease only if it is
ours (a last-writer check that narrows the race to milliseconds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

__all__ = ["LeaseBook", "DEFAULT_TTL_S"]

log = logging.getLogger(__name__)

#: Seconds a lease lives without renewal (the driver renews at a quarter of it).
DEFAULT_TTL_S = 1800.0
#: A local takeover lock older than this was left by a process that died mid-takeover.
TAKEOVER_LOCK_S = 60.0


@dataclass
class _Held:
    path: str
    etag: str | None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class LeaseBook:
    """The leases one run holds under ``OUT/leases`` on the store's filesystem."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, run_id: str, *, ttl: float = DEFAULT_TTL_S) -> None:
        self.fs = fs
        self.dir = f"{root.rstrip('/')}/leases"
        self.run_id = run_id
        self.ttl = ttl
        self.is_local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        self.held: dict[str, _Held] = {}
        self.renewed_at = time.time()
        if self.is_local:
            os.makedirs(self.dir, exist_ok=True)

    # -- the record --------------------------------------------------------------
    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({
            "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "renewed_at": now, "expires_at": now + self.ttl,
        }).encode()  # fmt: skip

    def _stale(self, rec: dict[str, Any]) -> bool:
        if rec.get("run_id") == self.run_id:
            return True
        if float(rec.get("expires_at") or 0) < time.time():
            return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid") or 0))

    def path(self, slide_id: str) -> str:
        return f"{self.dir}/{slide_id}.json"

    # -- acquire / renew / release --------------------------------------------------
    def acquire(self, slide_id: str) -> str | None:
        """Take ``slide_id``'s lease; returns None if taken, else who holds it (run id)."""
        path = self.path(slide_id)
        taken = self._acquire_local(path) if self.is_local else self._acquire_s3(path)
        if isinstance(taken, _Held):
            self.held[slide_id] = taken
            return None
        return taken

    def _create_local(self, path: str) -> bool:
        """Create ``path`` with the whole record, or return False if it exists.

        A complete temporary file is hard-linked to the name (``link`` fails if the name
        exists), so no reader ever sees a half-written lease.
        """
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._body())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _acquire_local(self, path: str) -> _Held | str:
        for _ in range(3):
            if self._create_local(path):
                return _Held(path, None)
            try:
                with open(path, "rb") as f:
                    seen = f.read()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            try:
                rec = json.loads(seen)
            except ValueError:
                rec = {}  # not a lease record (a damaged file): stale
            if rec and not self._stale(rec):
                return str(rec.get("run_id"))
            if self._take_over_local(path, seen):
                return _Held(path, None)
        return "another run (it took over the stale lease first)"

    def _take_over_local(self, path: str, seen: bytes) -> bool:
        """Replace the stale lease ``seen`` at ``path`` with ours, if nobody else did first.

        Under a takeover lock (itself created exclusively) the lease is read again and
        replaced only if it is still the stale record this run judged.
        """
        lock = f"{path}.takeover"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):  # a takeover that died half-way long ago
                if time.time() - os.path.getmtime(lock) > TAKEOVER_LOCK_S:
                    os.unlink(lock)
            return False
        os.close(fd)
        try:
            try:
                with open(path, "rb") as f:
                    if f.read() != seen:
                        return False  # another run took it over already
            except FileNotFoundError:
                return self._create_local(path)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._body())
            os.replace(tmp, path)
            return True
        finally:
            os.unlink(lock)

    def _bucket_key(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def _create_s3(self, path: str) -> _Held | None:
        """Create the lease if absent (``If-None-Match: *``); None if it exists and is not ours."""
        bucket, key = self._bucket_key(path)
        try:
            r = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")  # type: ignore[attr-defined]
            return _Held(path, r.get("ETag"))
        except FileExistsError:
            mine = self._ours_s3(path)  # our own PUT landed; only its reply was lost
            return _Held(path, mine) if mine else None

    def _acquire_s3(self, path: str) -> _Held | str:
        try:
            created = self._create_s3(path)
        except NotImplementedError:
            return self._acquire_fallback(path)
        if created is not None:
            return created
        try:  # the ETag first: if the body changes after, the conditional takeover fails
            etag = self.fs.info(path, refresh=True).get("ETag")
            rec = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:  # released meanwhile: one more try to create it
            return self._create_s3(path) or "another run"
        if not self._stale(rec):
            return str(rec.get("run_id"))
        bucket, key = self._bucket_key(path)
        try:
            r = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag)  # type: ignore[attr-defined]
            return _Held(path, r.get("ETag"))
        except (FileExistsError, OSError):
            mine = self._ours_s3(path)
            return _Held(path, mine) if mine else "another run (it took over the stale lease first)"

    def _ours_s3(self, path: str) -> str | None:
        """The lease's ETag if it holds this run's record (a PUT whose reply was lost), else None.

        A conditional PUT that reached the store but whose reply did not come back is
        retried by the client and then refused (412): the lease is ours all the same.
        """
        try:
            etag = self.fs.info(path, refresh=True).get("ETag")
            rec = json.loads(self.fs.cat_file(path))
        except (OSError, ValueError):
            return None
        return str(etag) if rec.get("run_id") == self.run_id and etag else None

    def _acquire_fallback(self, path: str) -> _Held | str:
        log.warning("the store refuses conditional writes; leases fall back to write-and-read-back")
        if self.fs.exists(path):
            rec = json.loads(self.fs.cat_file(path))
            if not self._stale(rec):
                return str(rec.get("run_id"))
        body = self._body()
        self.fs.pipe_file(path, body)
        return _Held(path, None) if self.fs.cat_file(path) == body else "another run"

    def renew_due(self) -> bool:
        return bool(self.held) and time.time() - self.renewed_at >= self.ttl / 4

    def renew(self) -> list[str]:
        """Push the expiry of every held lease; returns the slides whose lease was lost."""
        lost = []
        for sid, h in list(self.held.items()):
            try:
                if self.is_local:
                    with open(h.path, "rb") as f:
                        if json.loads(f.read() or b"{}").get("run_id") != self.run_id:
                            raise FileExistsError(h.path)
                    tmp = f"{h.path}.{uuid.uuid4().hex}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(self._body())
                    os.replace(tmp, h.path)
                else:
                    bucket, key = self._bucket_key(h.path)
                    kw = {"IfMatch": h.etag} if h.etag else {}
                    try:
                        r = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **kw)  # type: ignore[attr-defined]
                        h.etag = r.get("ETag")
                    except OSError:
                        mine = self._ours_s3(h.path)  # landed, reply lost: still ours
                        if mine is None:
                            raise
                        h.etag = mine
            except (OSError, ValueError) as e:
                log.warning("lease of %s lost (%s)", sid, e)
                lost.append(sid)
                del self.held[sid]
        self.renewed_at = time.time()
        return lost

    def release(self, slide_id: str) -> None:
        """Drop ``slide_id``'s lease (after its commit or failure); never raises."""
        h = self.held.pop(slide_id, None)
        if h is None:
            return
        try:
            rec = json.loads(self.fs.cat_file(h.path))
            if rec.get("run_id") == self.run_id:  # expired and taken over: not ours to drop
                self.fs.rm_file(h.path)
        except (OSError, ValueError) as e:  # an expired lease someone else removed, a flaky store: harmless
            log.warning("could not release the lease of %s: %s", slide_id, e)

    def release_all(self) -> None:
        for sid in list(self.held):
            self.release(sid)
