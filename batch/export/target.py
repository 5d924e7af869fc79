"""Where an export's files land: a local folder, or any fsspec URL (``s3://``) via local staging.

The format writers write local files (images through OpenCV, XML through
ElementTree, ...). For a remote ``--to``, `ExportTarget.folder` is a local
staging folder and `ExportTarget.publish` uploads every file written since its
last call, then deletes the local copy. The export calls it after each slide,
so the staging disk holds one slide's images plus the writers' index files,
never the whole export. ``export.json`` is published last: an export on object
storage is complete when its ``export.json`` is there.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batch.errors import ConfigError

__all__ = ["ExportTarget"]


class ExportTarget:
    """The export's destination.

    Parameters
    ----------
    to
        A local folder, ``file://`` URL or any fsspec URL (``s3://bucket/prefix``).
    storage_options
        fsspec options for ``to`` (an endpoint; never credentials).

    Attributes
    ----------
    folder
        The local folder the writers write to: ``to`` itself, or the staging folder.
    uri
        ``to`` as given (without a trailing ``/``).
    """

    def __init__(self, to: str | Path, *, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = str(to).rstrip("/") or str(to)
        self.fs, root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._staging: str | None = None
        if self.is_local:
            self.folder = Path(to) if isinstance(to, Path) or "://" not in str(to) else Path(root)
        else:
            self._staging = tempfile.mkdtemp(prefix="hemaray-export-")
            self.folder = Path(self._staging)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uploaded = 0

    def publish(self) -> int:
        """Upload the files written since the last call (remote ``to``); return how many.

        Raises
        ------
        ConfigError
            A file could not be written to ``to`` (no such bucket, no permission).
        """
        if self.is_local:
            return 0
        done = 0
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            rel = path.relative_to(self.folder).as_posix()
            try:
                self.fs.put_file(str(path), f"{self.root}/{rel}")
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"--to {self.uri}: cannot write {rel} ({type(e).__name__}: {e}); "
                    "check that the bucket exists and is writable, and --endpoint-url"
                ) from e
            path.unlink()
            done += 1
        self.uploaded += done
        return done

    def close(self) -> None:
        """Remove the staging folder (files not yet published are dropped)."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> ExportTarget:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
