"""Named shared-memory segments: tmpfs files under /dev/shm mapped with mmap.

Not ``multiprocessing.shared_memory``: that registers every segment with a
resource tracker which unlinks it when the creating process exits, and a
card's weights must outlive the card. Whoever owns a run removes its names.
"""
from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

SHM_DIR = Path(os.environ.get("RSD_SHM_DIR", "/dev/shm"))
# Held while a segment's name is created. A card whose host is gone takes it for good before it
# removes the run's segments and exits, so that no segment can be created after that removal.
CREATE_LOCK = threading.Lock()


class SegmentError(RuntimeError):
    """A shared-memory segment could not be created, found or mapped."""


class Segment:
    """One named shared-memory segment mapped into this process."""

    def __init__(self, name: str, size: int | None = None, *, create: bool = False):
        self.name = name
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            if create:
                with CREATE_LOCK:
                    fd = os.open(self.path, flags, 0o600)
            else:
                fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            raise SegmentError(
                f"shared-memory segment {self.path} already exists; it belongs to another run "
                f"or was left by one (`rsd-launch sweep` removes stale ones)"
            ) from None
        except FileNotFoundError:
            raise SegmentError(f"shared-memory segment {self.path} does not exist") from None
        try:
            if create:
                os.ftruncate(fd, max(int(size or 0), mmap.PAGESIZE))
            self.size = os.fstat(fd).st_size
            self.buf = mmap.mmap(fd, self.size)
        except OSError as exc:
            os.close(fd)
            if create:
                self.path.unlink(missing_ok=True)
            raise SegmentError(f"cannot map segment {self.path}: {exc}") from None
        os.close(fd)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass  # a view still exports the buffer; the mapping goes with it

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)
