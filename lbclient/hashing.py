"""Deterministic hashes over bytes.

Routing must not depend on the process: Python's built-in hash function is salted per process, so
every routing decision in lbclient goes through one of these functions instead. Each returns an
unsigned integer that is the same on every machine and in every process.

Part of the core: pure functions, no I/O; never Python's salted built-in hash.
"""

from __future__ import annotations

import zlib
from typing import Final

import xxhash

__all__ = ["MASK64", "crc32", "fnv1a_64", "le64", "xxh3_64"]

#: Mask for unsigned 64-bit arithmetic.
MASK64: Final = (1 << 64) - 1

_FNV_OFFSET: Final = 0xCBF29CE484222325
_FNV_PRIME: Final = 0x100000001B3

#: xxHash XXH3, 64 bits, seed 0.
xxh3_64 = xxhash.xxh3_64_intdigest

#: CRC-32 (IEEE 802.3, as zlib and nginx compute it).
crc32 = zlib.crc32


def fnv1a_64(data: bytes) -> int:
    """FNV-1a, 64 bits, over ``data`` (the variant Pingora's FNVHash uses)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & MASK64
    return h


def le64(value: int) -> bytes:
    """The 8-byte little-endian encoding of an unsigned 64-bit value."""
    return (value & MASK64).to_bytes(8, "little")
