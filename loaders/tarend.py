"""Whether a tar stream ended where the archive says it does.

tarfile takes a stream that stops at a header boundary, or inside a header, as the end of the archive, and stops
without a word at a damaged header further on; a shard cut short by a failed copy or download then yields its first
samples and hides the loss. A complete archive ends in zero blocks (POSIX writes two; tarfile accepts one) after
which nothing follows. `TarEnd` wraps the stream tarfile reads and checks that, once the reader is done.
"""
from __future__ import annotations

from typing import Optional

BLOCK = 512
_CHUNK = 1 << 20


class TarEnd:
    """A read-through wrapper of a tar stream. After the tar reader is done, `problem()` reads what is left and
    says what is wrong with the end, or None: the archive is whole, or is not a plain ustar stream (a compressed
    one is checked by its codec, which raises on a cut)."""

    def __init__(self, stream):
        self.stream = stream
        self._head = b""
        self._total = 0
        self._zeros = 0  # zero bytes at the end of what was read

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if len(self._head) < BLOCK:
            self._head += data[: BLOCK - len(self._head)]
        self._total += len(data)
        kept = len(data.rstrip(b"\0"))
        self._zeros = self._zeros + len(data) if kept == 0 else len(data) - kept
        return data

    def __getattr__(self, name):  # close(), name, ... of the stream
        return getattr(self.stream, name)

    def __repr__(self) -> str:  # webdataset names the stream in its messages
        return repr(self.stream)

    def problem(self) -> Optional[str]:
        if self._head[257:262] != b"ustar":  # not an uncompressed POSIX/GNU tar: nothing to say
            return None
        read_by_tar = self._total
        while True:  # tarfile reads records ahead; what it left must be the end's zero blocks and padding
            data = self.read(_CHUNK)
            if not data:
                break
            if data.strip(b"\0"):
                return f"the tar reader stopped at a damaged header; data after byte {read_by_tar} was not read"
        return _end_problem(self._total, self._zeros)


def file_end_problem(path) -> Optional[str]:
    """What is wrong with the end of a local tar file, from its first and last blocks only (None: nothing, or not a
    plain ustar file): a file cut short, which tarfile would read as a clean end. Cheap enough to ask of every
    shard before a long read."""
    with open(path, "rb") as f:
        head = f.read(BLOCK)
        if head[257:262] != b"ustar":
            return None
        size = f.seek(0, 2)
        f.seek(max(size - BLOCK, 0))
        tail = f.read()
    return _end_problem(size, len(tail) - len(tail.rstrip(b"\0")))


def _end_problem(size: int, trailing_zeros: int) -> Optional[str]:
    if size % BLOCK or trailing_zeros < BLOCK:
        return f"ends at byte {size} without the tar end-of-archive blocks (cut short)"
    return None
