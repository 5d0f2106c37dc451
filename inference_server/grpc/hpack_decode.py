"""HPACK (RFC 7541) header blocks for the gRPC transport: decoding, and the few literal fields we send.

Why our own walk over the fields: the `hpack` package's Decoder took 60–180 µs for the nine indexed
headers of a gRPC call on these machines, more than the whole call should cost. The RFC's tables
(the static table and the Huffman code) are the package's: we keep those and its Huffman decoder,
and do the field walk and the dynamic table here (an indexed field is one tuple lookup).

A block that changes no table state (only indexed fields and literals not indexed: what a client sends
once its first call has filled the table) decodes to the same fields as long as the table is unchanged;
h2load and most clients repeat such blocks call after call, so each decoder keeps their fields and a
repeat costs one dict lookup (7 µs less per call here). Any change to the table drops what it kept.
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE  # index 1..61
_STATIC_LEN = len(STATIC)
_HUFFMAN_CACHE_SIZE = 512
_BLOCK_CACHE_SIZE = 16  # distinct repeated blocks a connection keeps (cleared when full): a few hundred kB at most
_BLOCK_CACHE_MAX = 2048  # larger blocks are decoded each time (keeps the cache's memory small)
Fields = tuple[tuple[bytes, bytes], ...]


class HPACKError(Exception):
    """A header block that does not decode: the connection's header state is lost (COMPRESSION_ERROR)."""


def _huffman(raw: bytes, cache: dict[bytes, bytes] = {}) -> bytes:  # noqa: B006 (the process-wide cache)
    """A Huffman-coded string; the few values a client repeats (user-agent, timeouts) are decoded once."""
    out = cache.get(raw)
    if out is None:
        try:
            out = decode_huffman(raw)
        except Exception as e:  # hpack's own HPACKDecodingError, or an index error on garbage
            raise HPACKError(f"bad Huffman string: {e}") from None
        if len(cache) >= _HUFFMAN_CACHE_SIZE:
            cache.clear()
        cache[raw] = out
    return out


class HeaderDecoder:
    """One connection's decoding state (its dynamic table); every header block must pass through, in order."""

    def __init__(self, max_table_size: int = 4096, max_list_bytes: int = 16384):
        self.allowed = max_table_size  # SETTINGS_HEADER_TABLE_SIZE we advertise (the default)
        self.max_size = max_table_size
        self.max_list_bytes = max_list_bytes
        self.table: deque[tuple[bytes, bytes]] = deque()  # newest first (index 62)
        self.size = 0
        self.generation = 0  # counts the changes to the table: what a decoded block depended on
        self._blocks: dict[bytes, Fields] = {}  # blocks that changed nothing -> their fields (this generation)

    def decode(self, data: bytes) -> Fields:
        """The block's (name, value) pairs; HPACKError when it is malformed or over `max_list_bytes`.
        The same block decoded again under the same table gives the same (shared, immutable) tuple."""
        fields = self._blocks.get(data)
        if fields is not None:
            return fields
        generation = self.generation
        fields = tuple(self._walk(data))
        if self.generation == generation and len(data) <= _BLOCK_CACHE_MAX:
            if len(self._blocks) >= _BLOCK_CACHE_SIZE:
                self._blocks.clear()
            self._blocks[bytes(data)] = fields
        return fields

    def unchanged_by(self, data: bytes, fields: Fields) -> bool:
        """Whether decoding `data` again now gives `fields` and changes nothing: while `generation` stays
        as it is, the same bytes may then skip decoding."""
        return self._blocks.get(data) is fields

    def plain_value_span(self, data: bytes, name: bytes) -> tuple[int, int] | None:
        """Where in block `data` the value of the one field `name` lies, when it is a literal that leaves the table
        alone and is not Huffman-coded; else None (absent, twice, indexed, or coded). Such a field may change from
        one block to the next with the rest the same (grpc-timeout, set per call). For a block that changed
        nothing (`unchanged_by`): this reads the table, never changes it."""
        span = None
        pos, end = 0, len(data)
        try:
            while pos < end:
                b = data[pos]
                value_at: tuple[int, int] | None = None
                if b & 0x80:  # indexed field: its value comes from a table
                    idx, pos = _int(data, pos, 7)
                    field_name = self._get(idx)[0]
                elif b & 0x60:  # a literal added to the table, or a table size update: not a block that changed nothing
                    return None
                else:  # literal without indexing (0000) or never indexed (0001)
                    idx, pos = _int(data, pos, 4)
                    if idx:
                        field_name = self._get(idx)[0]
                    else:
                        field_name, pos = _string(data, pos)
                    coded = data[pos] & 0x80
                    n, start = _int(data, pos, 7)
                    pos = start + n
                    if pos > end:
                        return None
                    value_at = None if coded else (start, pos)
                if field_name == name:
                    if span is not None or value_at is None:
                        return None
                    span = value_at
        except (IndexError, HPACKError):
            return None
        return span

    def _walk(self, data: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        pos, end, listed = 0, len(data), 0
        try:
            while pos < end:
                b = data[pos]
                if b & 0x80:  # indexed field
                    idx, pos = _int(data, pos, 7)
                    field = self._get(idx)
                elif b & 0x40:  # literal, added to the table
                    field, pos = self._literal(data, pos, 6)
                    self._add(field)
                elif b & 0x20:  # table size update
                    size, pos = _int(data, pos, 5)
                    if size > self.allowed:
                        raise HPACKError(f"table size {size} over the {self.allowed} allowed")
                    self.max_size = size
                    self._changed()
                    self._evict(0)
                    continue
                else:  # literal without indexing (0000) or never indexed (0001)
                    field, pos = self._literal(data, pos, 4)
                listed += len(field[0]) + len(field[1]) + 32
                if listed > self.max_list_bytes:
                    raise HPACKError(f"header list over {self.max_list_bytes} bytes")
                out.append(field)
        except IndexError:
            raise HPACKError("truncated header block") from None
        return out

    def _get(self, idx: int) -> tuple[bytes, bytes]:
        if 0 < idx <= _STATIC_LEN:
            return STATIC[idx - 1]
        i = idx - _STATIC_LEN - 1
        if idx == 0 or i >= len(self.table):
            raise HPACKError(f"header index {idx} is not in the table")
        return self.table[i]

    def _literal(self, data: bytes, pos: int, prefix: int) -> tuple[tuple[bytes, bytes], int]:
        idx, pos = _int(data, pos, prefix)
        if idx:
            name = self._get(idx)[0]
        else:
            name, pos = _string(data, pos)
        value, pos = _string(data, pos)
        return (name, value), pos

    def _changed(self) -> None:
        self.generation += 1
        if self._blocks:
            self._blocks.clear()

    def _add(self, field: tuple[bytes, bytes]) -> None:
        self._changed()
        size = len(field[0]) + len(field[1]) + 32
        if size > self.max_size:  # an entry larger than the table empties it (RFC 7541 4.4)
            self.table.clear()
            self.size = 0
            return
        self._evict(size)
        self.table.appendleft(field)
        self.size += size

    def _evict(self, room: int) -> None:
        while self.table and self.size + room > self.max_size:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32


def _int(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HPACKError("integer too large")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    huffman = data[pos] & 0x80
    n, pos = _int(data, pos, 7)
    end = pos + n
    if end > len(data):
        raise HPACKError("truncated string")
    raw = bytes(data[pos:end])
    return (_huffman(raw) if huffman else raw), end


# --- encoding: literal fields without indexing and without Huffman (our answers are few and small)
def encode_int(value: int, prefix: int, first: int = 0) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([first | value])
    out = bytearray([first | mask])
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name (RFC 7541 6.2.2)."""
    return b"\x00" + encode_int(len(name), 7) + name + encode_int(len(value), 7) + value
