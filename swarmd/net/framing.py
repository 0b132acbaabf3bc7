"""Length-prefixed framing for a byte stream (sans-IO).

Every frame is a 4-byte big-endian length followed by that many bytes. The
length is checked against a maximum *before* any payload is buffered, so a
peer announcing a 4 GiB frame costs us four bytes of memory, not four GiB.
"""

from __future__ import annotations

from swarmd.errors import ERR_TOO_LARGE, SwarmdError

HEADER_SIZE = 4


class FrameTooLarge(SwarmdError):
    """The peer announced a frame longer than the configured maximum."""

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(ERR_TOO_LARGE, f"frame of {size} bytes announced, the maximum is {max_size} bytes")
        self.size = size
        self.max_size = max_size


def encode_frame(payload: bytes) -> bytes:
    """One frame on the wire: 4-byte big-endian length, then the payload."""
    return len(payload).to_bytes(4, "big") + payload


class FrameDecoder:
    """Turns arbitrary chunks of a byte stream back into frames.

    Holds at most one partial frame (≤ max_size + 4 bytes); `feed` returns the
    frames completed by the new bytes, in order.
    """

    __slots__ = ("max_size", "_buf")

    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        """Frames completed by data, in order.

        Frames lying wholly inside `data` come back as memoryviews of it (no
        copy); only a frame that straddles two reads is copied, once, into a
        buffer of its own. Callers consume them before the next feed.
        """
        out: list[bytes | memoryview] = []
        buf = self._buf
        max_size = self.max_size
        view = memoryview(data)
        if buf:
            # finish the frame begun in an earlier read; copy only that frame
            if len(buf) < HEADER_SIZE:
                take = HEADER_SIZE - len(buf)
                buf += view[:take]
                view = view[take:]
                if len(buf) < HEADER_SIZE:
                    return out
            n = int.from_bytes(buf[:HEADER_SIZE], "big")
            if n > max_size:
                self._buf = bytearray()
                raise FrameTooLarge(n, max_size)
            need = HEADER_SIZE + n - len(buf)
            if len(view) < need:
                buf += view
                return out
            buf += view[:need]
            # hand the completed frame over as a view of its own buffer (no second and third
            # copy) and start a fresh buffer for the next partial frame
            out.append(memoryview(buf)[HEADER_SIZE:])
            self._buf = buf = bytearray()
            view = view[need:]
        pos = 0
        end = len(view)
        while end - pos >= HEADER_SIZE:
            n = int.from_bytes(view[pos : pos + HEADER_SIZE], "big")
            if n > max_size:
                raise FrameTooLarge(n, max_size)
            stop = pos + HEADER_SIZE + n
            if stop > end:
                break
            out.append(view[pos + HEADER_SIZE : stop])
            pos = stop
        if pos < end:
            buf += view[pos:]
        return out
