"""The two locks that serialize registry writers (see registry.py for why each exists).

- ``FileLock``: ``flock`` on ``registry.lock`` for local and NFS roots: no cluster needed, and the kernel releases
  it the instant its holder dies;
- ``ActorLock``: a lease held in a named detached Ray actor for object-store roots, which have no locks; the
  holder renews the lease while it works, and a killed holder's lease lapses.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from see_ray.registry.errors import RegistryError, RegistryLockTimeout

ACTOR_NAMESPACE = "see_ray"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- locks ------------------------------------------------------------------------------------------------
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


class FileLock:
    """flock on a file next to the registry. flock (unlike fcntl/lockf) conflicts between two descriptors of
    one process too; a per-path thread lock covers threads of one process on NFS, where flock is emulated
    with per-process POSIX locks."""

    def __init__(self, path: Path, timeout_s: float):
        self.path, self.timeout_s = path, timeout_s
        with _thread_locks_guard:
            self._tlock = _thread_locks.setdefault(str(path), threading.Lock())

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout_s
        if not self._tlock.acquire(timeout=self.timeout_s):
            raise RegistryLockTimeout(f"registry lock {self.path}: busy for {self.timeout_s:.0f} s")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise RegistryLockTimeout(
                                f"registry lock {self.path}: held by another writer for {self.timeout_s:.0f} s"
                            ) from None
                        time.sleep(0.05)
                try:
                    os.ftruncate(fd, 0)  # who holds it, for humans debugging a wait
                    os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {now_iso()}\n".encode())
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            self._tlock.release()


class _LockActor:
    """Lease lock held in a named detached actor (object-store roots). Plain class; wrapped by ray.remote."""

    def __init__(self):
        self.owner: str | None = None
        self.expires = 0.0

    def acquire(self, owner: str, lease_s: float) -> bool:
        now = time.time()
        if self.owner is None or self.owner == owner or now > self.expires:
            self.owner, self.expires = owner, now + lease_s
            return True
        return False

    def renew(self, owner: str, lease_s: float) -> bool:
        if self.owner != owner:
            return False
        self.expires = time.time() + lease_s
        return True

    def release(self, owner: str) -> None:
        if self.owner == owner:
            self.owner, self.expires = None, 0.0

    def holder(self) -> tuple[str | None, float]:
        return self.owner, self.expires


class ActorLock:
    def __init__(self, storage_uri: str, timeout_s: float, lease_s: float = 60.0):
        import ray

        if not ray.is_initialized():
            if not os.environ.get("RAY_ADDRESS"):
                raise RegistryError(
                    f"the registry at {storage_uri} is on an object store: writes are serialized by a Ray actor, "
                    "so they must run inside the Ray cluster (a job) or with RAY_ADDRESS set"
                )
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        self.timeout_s, self.lease_s = timeout_s, lease_s
        name = "registry-lock-" + hashlib.sha256(storage_uri.encode()).hexdigest()[:16]
        self.actor = (
            ray.remote(_LockActor)
            .options(name=name, namespace=ACTOR_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0)
            .remote()
        )
        self.name = name

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        import ray

        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + self.timeout_s
        while not ray.get(self.actor.acquire.remote(owner, self.lease_s)):
            if time.monotonic() > deadline:
                holder = ray.get(self.actor.holder.remote())[0]
                raise RegistryLockTimeout(f"registry lock {self.name}: held by {holder} for {self.timeout_s:.0f} s")
            time.sleep(0.2)
        stop = threading.Event()

        def renew():  # keep the lease while we work; a dead process stops renewing and the lease lapses
            while not stop.wait(self.lease_s / 3):
                ray.get(self.actor.renew.remote(owner, self.lease_s))

        t = threading.Thread(target=renew, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=5)
            ray.get(self.actor.release.remote(owner))


