"""Whether a tar stream ended where the archive says it does.

tarfile takes a stream that stops at a header boundary, or inside a header, as the end of the archive, and stops
without a word at a damaged header further on; a shard cut short by a failed copy or download then yields its first
samples and hides the loss. A complete archive ends in zero blocks (POSIX writes two; tarfile accepts one) after
which nothing follows. `TarEnd` wraps the stream tarfile reads and checks that, once the reader is done.

A compressed shard (gzip, bzip2, xz) is no safer: tarfile's decompression stops quietly where the file does, so a
cut that falls between members hides the loss too. `TarEnd` therefore decompresses such a stream itself, hands
tarfile the plain tar, and checks both ends: the codec's end-of-stream marker, and the tar's zero blocks.
"""
from __future__ import annotations

import bz2
import lzma
import tarfile
import zlib
from typing import Optional

BLOCK = 512
_CHUNK = 1 << 20
_RAW_CHUNK = 1 << 14  # small: a corrupt compressed chunk costs the samples decompressed from it

# magic bytes -> a new decompressor of that format (each with .decompress, .eof, .unused_data)
_CODECS = {b"\x1f\x8b": lambda: zlib.decompressobj(wbits=31), b"BZh": bz2.BZ2Decompressor,
           b"\xfd7zXZ\x00": lzma.LZMADecompressor}


class TarEnd:
    """A read-through wrapper of a tar stream (decompressed, if it is a compressed one). After the tar reader is
    done, `problem()` reads what is left and says what is wrong with the end, or None: the archive is whole, or is
    not a POSIX/GNU tar."""

    def __init__(self, stream):
        self.stream = stream
        self._head = b""
        self._total = 0
        self._zeros = 0  # zero bytes at the end of what was read
        self._make = self._codec = None  # a compressed stream's decompressor (and its maker), from the first read
        self._started = False
        self._decoded, self._pos = b"", 0  # decompressed bytes not yet handed out: self._decoded[self._pos:]
        self._raw_end = False
        self._truncated = False  # a compressed stream ended before its end-of-stream marker

    def read(self, size: int = -1) -> bytes:
        data = self._read(size)
        if len(self._head) < BLOCK:
            self._head += data[: BLOCK - len(self._head)]
        self._total += len(data)
        kept = len(data.rstrip(b"\0"))
        self._zeros = self._zeros + len(data) if kept == 0 else len(data) - kept
        return data

    def _read(self, size: int) -> bytes:
        if not self._started:
            self._started = True
            first = self.stream.read(_RAW_CHUNK)
            while 0 < len(first) < 6:  # a pipe may return less: enough for the magic bytes, or the end
                more = self.stream.read(_RAW_CHUNK)
                if not more:
                    break
                first += more
            make = next((m for magic, m in _CODECS.items() if first.startswith(magic)), None)
            if make is None:  # a plain tar: read through
                self._decoded = first
            else:
                self._make, self._codec = make, make()
                self._decoded = self._decompress(first)
        while self._codec is not None and not self._raw_end and (size < 0 or len(self._decoded) - self._pos < size):
            raw = self.stream.read(_RAW_CHUNK)
            if not raw:
                self._raw_end = True
                self._truncated = not self._codec.eof
                break
            self._decoded = self._decoded[self._pos:] + self._decompress(raw)
            self._pos = 0
        if self._pos < len(self._decoded):  # what is buffered first
            end = len(self._decoded) if size < 0 else self._pos + size
            data, self._pos = self._decoded[self._pos:end], min(end, len(self._decoded))
            if size < 0 and self._codec is None:
                data += self.stream.read()
            return data
        return b"" if self._codec is not None else self.stream.read(size)

    def _decompress(self, raw: bytes) -> bytes:
        out = []
        try:
            while raw:
                if self._codec.eof:  # another member follows (concatenated gzip files, bzip2 streams)
                    if not raw.strip(b"\0"):  # or zero padding, which gzip itself ignores
                        break
                    self._codec = self._make()
                out.append(self._codec.decompress(raw))
                raw = self._codec.unused_data
        except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
            raise tarfile.ReadError(f"invalid compressed data ({e})") from None
        return b"".join(out)

    def __getattr__(self, name):  # close(), name, ... of the stream
        return getattr(self.stream, name)

    def __repr__(self) -> str:  # webdataset names the stream in its messages
        return repr(self.stream)

    def problem(self) -> Optional[str]:
        if self._head[257:262] != b"ustar":  # not a POSIX/GNU tar: nothing to say
            return None
        read_by_tar = self._total
        while True:  # tarfile reads records ahead; what it left must be the end's zero blocks and padding
            data = self.read(_CHUNK)
            if not data:
                break
            if data.strip(b"\0"):
                return f"the tar reader stopped at a damaged header; data after byte {read_by_tar} was not read"
        if self._truncated:
            return (f"the compressed stream ends before its end marker, after {self._total} bytes of tar data (cut "
                    f"short)")
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
