"""HPACK (RFC 7541) for the lean gRPC lane: decoding, with a cache of whole header blocks, and
the two encoder pieces its fixed answer blocks are written with (`hpack_int`, `literal`).

Why not the `hpack` package's Decoder: it costs ~110 µs per gRPC request here (a debug
log call and a str round trip per field), a third of what the lane may spend on a whole
call. A gRPC client sends nearly the same header block on every call of a connection,
after the first ones as references to its dynamic table; a block that leaves the table
as it was decodes to the same fields as long as the table does not change, so such
blocks (short ones, and at most CACHE_BYTES of them and their fields per connection)
are cached by their bytes, and the cache is emptied whenever the table changes.
The static table and the Huffman code are the `hpack` package's (pure data and a
decoder used only for literals: rare once a connection is warm).

Malformed input (an index out of the tables, a truncated integer or string, a size
update above the limit or out of place, a list over its limit) raises HpackError with a
sentence; the caller answers COMPRESSION_ERROR (the decoder's state is then unknown).
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC: tuple[tuple[bytes, bytes], ...] = ((b"", b""), *HeaderTable.STATIC_TABLE)  # 1-based
CACHE_BLOCK_MAX = 1024  # only blocks this short are cached (a warm gRPC request head is ~10-300 bytes)
CACHE_BYTES = 128 * 1024  # blocks plus their decoded fields cached per connection, at most
MAX_INT_BYTES = 4  # continuation bytes of one HPACK integer: values below 2^28 + prefix


class HpackError(ValueError):
    """The peer's header block does not decode."""


class OversizedHeaderList(HpackError):
    """The decoded header list is over the limit (SETTINGS_MAX_HEADER_LIST_SIZE)."""


def _int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer at block[pos] with an N-bit prefix: (value, position after it)."""
    top = (1 << prefix_bits) - 1
    value = block[pos] & top
    pos += 1
    if value < top:
        return value, pos
    shift = 0
    for _ in range(MAX_INT_BYTES + 1):
        if pos >= len(block):
            raise HpackError("header block ends inside an integer")
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
    raise HpackError(f"integer of more than {MAX_INT_BYTES + 1} bytes in the header block")


class HpackDecoder:
    """One connection's decoding context: its dynamic table and its cache of blocks."""

    def __init__(self, max_table_size: int = 4096, max_header_list: int = 16384) -> None:
        self.limit = max_table_size  # SETTINGS_HEADER_TABLE_SIZE we advertised
        self.max_size = max_table_size  # the table's size now (the peer's size updates)
        self.size = 0
        self.table: deque[tuple[bytes, bytes]] = deque()  # newest first: index 62 is table[0]
        self.max_header_list = max_header_list
        self.cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.cache_bytes = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The (name, value) fields of one whole header block, in order."""
        hit = self.cache.get(block)
        if hit is not None:
            return hit
        fields, changed, size = self._decode(block)
        if changed:
            self.cache.clear()
            self.cache_bytes = 0
        elif len(block) <= CACHE_BLOCK_MAX:
            cost = len(block) + size
            if self.cache_bytes + cost > CACHE_BYTES:
                self.cache.clear()
                self.cache_bytes = 0
            self.cache[block] = fields
            self.cache_bytes += cost
        return fields

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index < len(STATIC):
            return STATIC[index]
        i = index - len(STATIC)
        if index <= 0 or i >= len(self.table):
            raise HpackError(f"header index {index} is in neither table (static 1-61, dynamic "
                             f"{len(self.table)} entries)")
        return self.table[i]

    def _literal(self, block: bytes, pos: int, bits: int) -> tuple[bytes, bytes, int]:
        """A literal field (RFC 7541 §6.2): its name by index (`bits`-bit prefix) or as a string,
        then its value; returns (name, value, position after it)."""
        index, pos = _int(block, pos, bits)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._string(block, pos)
        value, pos = self._string(block, pos)
        return name, value, pos

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(block):
            raise HpackError("header block ends before a string")
        huffman = block[pos] & 0x80
        length, pos = _int(block, pos, 7)
        end = pos + length
        if end > len(block):
            raise HpackError(f"string of {length} bytes runs past the header block")
        raw = block[pos:end]
        if huffman:
            try:
                raw = bytes(decode_huffman(raw))
            except Exception as e:
                raise HpackError(f"Huffman-coded string does not decode: {e}") from None
        return raw, end

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        if size > self.max_size:
            self.table.clear()  # RFC 7541 §4.4: an entry larger than the table empties it
            self.size = 0
            return
        self.table.appendleft((name, value))
        self.size += size
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32

    def _decode(self, block: bytes) -> tuple[list[tuple[bytes, bytes]], bool, int]:
        """(fields, whether the dynamic table changed, the list's RFC 7541 size)."""
        fields: list[tuple[bytes, bytes]] = []
        changed = False
        total = 0
        pos, n = 0, len(block)
        while pos < n:
            c = block[pos]
            if c & 0x80:  # indexed field
                index, pos = _int(block, pos, 7)
                name, value = self._entry(index)
            elif c & 0x40:  # literal with incremental indexing
                name, value, pos = self._literal(block, pos, 6)
                self._add(name, value)
                changed = True
            elif c & 0x20:  # dynamic table size update: only before the first field
                if fields:
                    raise HpackError("table size update after a header field (RFC 7541 §4.2)")
                size, pos = _int(block, pos, 5)
                if size > self.limit:
                    raise HpackError(f"table size update to {size} over SETTINGS_HEADER_TABLE_SIZE {self.limit}")
                self.max_size = size
                self._evict()
                changed = True
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                name, value, pos = self._literal(block, pos, 4)
            total += len(name) + len(value) + 32
            if total > self.max_header_list:
                raise OversizedHeaderList(f"header list over {self.max_header_list} bytes")
            fields.append((name, value))
        return fields, changed, total


# -- encoding: the two pieces the lane's fixed answer blocks need --------------------


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with `first` holding the bits above the prefix."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out = [first | top]
    value -= top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing, new name, no Huffman: the encoder
    never touches the peer's dynamic table, so no table state to keep."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


__all__ = ["HpackDecoder", "HpackError", "OversizedHeaderList", "hpack_int", "literal"]
