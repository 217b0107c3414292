"""Where the registry, adapters and training runs live: one storage root, addressed by a URI.

The root is a local folder by default (``$SEE_RAY_STORAGE`` or ``~/see-ray-storage``) and, in a cluster, any
URI that ``pyarrow.fs`` understands (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///nfs/see``, an NFS
mount path, ``hdfs://...``). pyarrow comes with Ray, and Ray Train's ``RunConfig(storage_path=...)`` accepts the
very same URIs, so one string configures both. URIs pyarrow does not know are opened through fsspec (any
installed fsspec implementation: ``az://`` with adlfs, ``memory://`` in tests, ...) wrapped in pyarrow's
``PyFileSystem(FSSpecHandler(...))``, the adapter Ray documents for custom file systems.

Two guarantees matter to the registry and are provided here:
- ``write_text_atomic``: readers see the old content or the new one, never a mix. On a file system (local or
  NFS) that is "write a temporary sibling, fsync, rename over the target" (rename is atomic within a
  directory); on an object store a single PUT is atomic by itself (the object appears whole or not at all),
  and object stores have no rename to speak of.
- ``upload_dir`` / ``download_dir``: copy an adapter folder in or out. Uploads are not atomic on object
  stores, which is why the registry only ever points at a folder after it has been fully uploaded.

Paths inside the root are relative, '/'-separated strings (``"adapters/shout/v2"``).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

STORAGE_ENV = "SEE_RAY_STORAGE"
DEFAULT_LOCAL_STORAGE = "~/see-ray-storage"


class StorageError(OSError):
    """A storage URI is invalid or an operation on it failed; the message names the URI."""


def default_storage_uri() -> str:
    """``$SEE_RAY_STORAGE`` if set, else ``~/see-ray-storage`` (absolute: jobs run in a temporary cwd)."""
    return os.environ.get(STORAGE_ENV) or str(Path(DEFAULT_LOCAL_STORAGE).expanduser())


def is_uri(s: str) -> bool:
    return "://" in s


class Storage:
    """A storage root: a pyarrow file system plus the root path inside it."""

    def __init__(self, uri: str | None = None, filesystem: pafs.FileSystem | None = None):
        uri = uri or default_storage_uri()
        if filesystem is not None:  # tests (pyarrow's in-memory mock store) and callers with credentials
            self.fs, root = filesystem, uri.split("://", 1)[-1]
            self.native = False
        else:
            if not is_uri(uri):
                # Relative local paths would land in a Ray job's temporary working directory and vanish.
                uri = str(Path(uri).expanduser().resolve())
            try:
                self.fs, root = pafs.FileSystem.from_uri(uri)
                self.native = True
            except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for bad URIs
                self.fs, root = _fsspec_filesystem(uri, e)
                self.native = False
        self.uri = uri.rstrip("/") if uri != "/" else uri
        self.root = root.rstrip("/") or "/"
        # Local (and NFS, which the kernel presents as local) file systems have atomic rename and POSIX
        # locks; everything else is treated as an object store.
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # -- paths ------------------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Path inside ``self.fs`` of a root-relative path."""
        rel = rel.strip("/")
        if ".." in rel.split("/"):
            raise StorageError(f"path {rel!r} escapes the storage root")
        return posixpath.join(self.root, rel) if rel else self.root

    def uri_of(self, rel: str) -> str:
        """Full URI (or absolute local path) of a root-relative path: what records store."""
        rel = rel.strip("/")
        return f"{self.uri}/{rel}" if rel else self.uri

    def for_ray_train(self, rel: str) -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig: the URI itself when pyarrow
        resolves it (every node resolves it again, with its own credentials), else the path inside the
        fsspec-backed file system object, which Ray ships to the workers."""
        if self.native:
            return self.uri_of(rel), None
        return self.path(rel), self.fs

    def local_path(self, rel: str = "") -> Path:
        if not self.is_local:
            raise StorageError(f"{self.uri} is not a local file system")
        return Path(self.path(rel))

    # -- small files ------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if "not found" in str(e).lower() or "no such file" in str(e).lower():
                raise FileNotFoundError(self.uri_of(rel)) from None
            raise StorageError(f"{self.uri_of(rel)}: read failed ({e})") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text_atomic(self, rel: str, text: str) -> None:
        """Replace ``rel`` with ``text`` so that readers see either the old or the new content."""
        data = text.encode("utf-8")
        target = self.path(rel)
        if self.is_local:
            parent = Path(target).parent
            parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(target).name}.", suffix=".tmp", dir=parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the name points at them
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
                _fsync_dir(parent)  # and the rename itself survives a power cut
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            # One PUT: the object store publishes the object whole when the stream closes.
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def probe_writable(self) -> None:
        """Raise OSError (naming the root) unless a file can be created and removed under the root."""
        rel = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_text_atomic(rel, "probe")
        except OSError as e:
            raise StorageError(e.errno, e.strerror or str(e), self.uri) from None
        self.delete_file(rel)

    def delete_file(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    # -- folders ----------------------------------------------------------------------------------------
    def list_dir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty if it does not exist)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in info)

    def delete_dir(self, rel: str) -> None:
        p = self.path(rel)
        if p == self.root:
            raise StorageError("refusing to delete the storage root")
        if self.fs.get_file_info(p).type == pafs.FileType.NotFound:
            return
        self.fs.delete_dir(p)

    def upload_dir(self, local_dir: str | Path, rel: str) -> str:
        """Copy a local folder to ``rel`` (replacing whatever was there); returns its URI.

        On a local root the copy goes to a temporary sibling first and is renamed into place, so even the
        folder appears whole. On object stores it is uploaded file by file; callers publish a reference to
        it only afterwards (the registry does).
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"upload: {local_dir} is not a folder")
        target = self.path(rel)
        if self.is_local:
            import shutil

            parent = Path(target).parent
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{Path(target).name}.", dir=parent))
            try:
                shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
                os.chmod(tmp, 0o755)
                if Path(target).exists():
                    shutil.rmtree(target)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:
            self.delete_dir(rel)
            self.fs.create_dir(target, recursive=True)
            pafs.copy_files(str(local_dir.resolve()), target, pafs.LocalFileSystem(), self.fs)
        return self.uri_of(rel)

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy the folder ``rel`` into ``local_dir`` (created); returns ``local_dir``."""
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        src = self.path(rel)
        if self.fs.get_file_info(src).type != pafs.FileType.Directory:
            raise StorageError(f"{self.uri_of(rel)}: no such folder")
        pafs.copy_files(src, str(local_dir.resolve()), self.fs, pafs.LocalFileSystem())
        return local_dir

    def local_dir(self, rel: str, cache_dir: str | Path | None = None) -> Path:
        """A local folder with the content of folder ``rel``: the folder itself on a local root, else a
        downloaded copy (under ``cache_dir`` or a new temporary folder)."""
        if self.is_local:
            p = self.local_path(rel)
            if not p.is_dir():
                raise StorageError(f"{self.uri_of(rel)}: no such folder")
            return p
        dest = Path(cache_dir or tempfile.mkdtemp(prefix="see-adapter-")) / uuid.uuid4().hex[:8]
        return self.download_dir(rel, dest)


def _fsspec_filesystem(uri: str, pyarrow_error: Exception) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
    except Exception as e:  # ValueError: unknown protocol; ImportError: its package is not installed
        raise StorageError(
            f"storage {uri!r}: not a URI pyarrow or fsspec supports (pyarrow: {pyarrow_error}; fsspec: {e})"
        ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
