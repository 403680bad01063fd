"""ext4's checksums (crc32c for ``metadata_csum``, crc16 for ``uninit_bg`` group
descriptors) and the directory-index name hashes (legacy, half-MD4, TEA)."""

from __future__ import annotations

from enum import IntEnum

import crc32c

from .. import FormatError
from .errors import Ext2Unsupported

M32 = 0xFFFFFFFF
DX_HASH_EOF = 0x7FFFFFFF


def ext4_crc32c(seed: int, data: bytes | bytearray | memoryview) -> int:
    """ext4's crc32c: the raw CRC register, seeded with ``seed``, without final inversion."""
    return int(crc32c.crc32c(data, value=seed ^ M32)) ^ M32


def _make_crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16_TABLE = _make_crc16_table()


def crc16(crc: int, data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0xA001) as used for ``uninit_bg`` descriptors."""
    for byte in data:
        crc = (crc >> 8) ^ _CRC16_TABLE[(crc ^ byte) & 0xFF]
    return crc


# --------------------------------------------------------------------------------------
# Directory index hashes


class HashVersion(IntEnum):
    """``dx_root.info.hash_version`` values (``*_UNSIGNED`` chosen by superblock s_flags)."""

    LEGACY = 0
    HALF_MD4 = 1
    TEA = 2
    LEGACY_UNSIGNED = 3
    HALF_MD4_UNSIGNED = 4
    TEA_UNSIGNED = 5
    SIPHASH = 6


_DEFAULT_HASH_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_TEA_DELTA = 0x9E3779B9
_MD4_K2 = 0x5A827999
_MD4_K3 = 0x6ED9EBA1
# (input word index, rotation) for the three rounds of the halved MD4 transform
_MD4_ROUNDS = (
    ((0, 3), (1, 7), (2, 11), (3, 19), (4, 3), (5, 7), (6, 11), (7, 19)),
    ((1, 3), (3, 5), (5, 9), (7, 13), (0, 3), (2, 5), (4, 9), (6, 13)),
    ((3, 3), (7, 9), (2, 11), (6, 15), (1, 3), (5, 9), (0, 11), (4, 15)),
)


def _char(c: int, signed: bool) -> int:
    return c - 256 if signed and c >= 128 else c


def _legacy_hash(name: bytes, signed: bool) -> int:
    h0, h1 = 0x12A3FE2D, 0x37ABE8F9
    for c in name:
        h = (h1 + (h0 ^ ((_char(c, signed) * 7152373) & M32))) & M32
        if h & 0x80000000:
            h = (h - 0x7FFFFFFF) & M32
        h1, h0 = h0, h
    return (h0 << 1) & M32


def _str2hashbuf(msg: bytes, num: int, signed: bool) -> list[int]:
    """Pack up to ``4 * num`` bytes of ``msg`` into ``num`` words, padded by its length."""
    pad = len(msg) | (len(msg) << 8)
    pad = (pad | (pad << 16)) & M32
    val = pad
    words: list[int] = []
    for i in range(min(len(msg), num * 4)):
        val = (_char(msg[i], signed) + (val << 8)) & M32
        if i % 4 == 3:
            words.append(val)
            val = pad
    if len(words) < num:
        words.append(val)
    while len(words) < num:
        words.append(pad)
    return words


def _rol32(x: int, s: int) -> int:
    return ((x << s) | (x >> (32 - s))) & M32


def _half_md4_transform(buf: list[int], data: list[int]) -> None:
    v = list(buf)
    for rnd, schedule in enumerate(_MD4_ROUNDS):
        for step, (idx, shift) in enumerate(schedule):
            t = (0, 3, 2, 1)[step % 4]  # targets a, d, c, b in turn
            x, y, z = v[(t + 1) % 4], v[(t + 2) % 4], v[(t + 3) % 4]
            if rnd == 0:
                f, k = z ^ (x & (y ^ z)), 0
            elif rnd == 1:
                f, k = (x & y) + ((x ^ y) & z), _MD4_K2
            else:
                f, k = x ^ y ^ z, _MD4_K3
            v[t] = _rol32((v[t] + f + data[idx] + k) & M32, shift)
    for i in range(4):
        buf[i] = (buf[i] + v[i]) & M32


def _tea_transform(buf: list[int], data: list[int]) -> None:
    s = 0
    b0, b1 = buf[0], buf[1]
    a, b, c, d = data
    for _ in range(16):
        s = (s + _TEA_DELTA) & M32
        b0 = (b0 + ((((b1 << 4) + a) & M32) ^ ((b1 + s) & M32) ^ ((b1 >> 5) + b))) & M32
        b1 = (b1 + ((((b0 << 4) + c) & M32) ^ ((b0 + s) & M32) ^ ((b0 >> 5) + d))) & M32
    buf[0] = (buf[0] + b0) & M32
    buf[1] = (buf[1] + b1) & M32


def dx_hash(
    name: bytes, version: int, seed: tuple[int, int, int, int] = (0, 0, 0, 0)
) -> tuple[int, int]:
    """Return ``(major, minor)`` directory-index hash of ``name`` as ext4 computes it.

    ``version`` is a :class:`HashVersion` (0-5; the unsigned variants treat name bytes as
    unsigned chars).  An all-zero ``seed`` means the default MD4 seed.  The major hash has
    its low bit clear (the collision bit).  Raises :class:`Ext2Unsupported` for SipHash
    (casefolded encrypted directories) and :class:`FormatError` for unknown versions.
    """
    if version in (HashVersion.LEGACY, HashVersion.LEGACY_UNSIGNED):
        major, minor = _legacy_hash(name, version == HashVersion.LEGACY), 0
    elif version in (HashVersion.HALF_MD4, HashVersion.HALF_MD4_UNSIGNED,
                     HashVersion.TEA, HashVersion.TEA_UNSIGNED):  # fmt: skip
        signed = version in (HashVersion.HALF_MD4, HashVersion.TEA)
        buf = list(seed) if any(seed) else list(_DEFAULT_HASH_SEED)
        md4 = version in (HashVersion.HALF_MD4, HashVersion.HALF_MD4_UNSIGNED)
        step = 32 if md4 else 16
        for pos in range(0, len(name), step):
            if md4:
                _half_md4_transform(buf, _str2hashbuf(name[pos:], 8, signed))
            else:
                _tea_transform(buf, _str2hashbuf(name[pos:], 4, signed))
        major, minor = (buf[1], buf[2]) if md4 else (buf[0], buf[1])
    elif version == HashVersion.SIPHASH:
        raise Ext2Unsupported("directory hash version 6 (siphash, casefolded encrypted "
                              "directories) is not supported")  # fmt: skip
    else:
        raise FormatError(f"unknown directory hash version {version}")
    major &= ~1 & M32
    if major == (DX_HASH_EOF << 1) & M32:
        major = ((DX_HASH_EOF - 1) << 1) & M32
    return major, minor
