"""Content-addressed image files: the name is the SHA-256 of the PNG bytes.

Writing the same image twice is a no-op, so a redelivered generation cannot leave two files behind, and a
file is never seen half-written (temporary file, fsync, atomic rename).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredImage:
    path: str
    """Relative to the store's root, e.g. ``ab/cd/abcd....png``."""
    sha256: str
    size_bytes: int


class ImageStore:
    """PNG files under ``root``, fanned out by the first two bytes of their hash."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, png: bytes) -> StoredImage:
        digest = hashlib.sha256(png).hexdigest()
        relative = f"{digest[:2]}/{digest[2:4]}/{digest}.png"
        target = self.root / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".png")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(png)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return StoredImage(path=relative, sha256=digest, size_bytes=len(png))

    def resolve(self, relative: str) -> Path:
        """Absolute path of a stored image; refuses paths that would leave the root."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"image path {relative!r} is outside the image store")
        return path

    def read(self, relative: str) -> bytes:
        return self.resolve(relative).read_bytes()
