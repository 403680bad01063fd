"""Tar member maps: where each member's bytes live inside an archive.

`scan_tar` walks the headers of an uncompressed tar archive and returns a
`TarIndex`: for every regular member (and every hard or symbolic link that resolves to
one) a `TarMember` that says where its data starts in the archive, how large it is and,
for sparse members, which logical ranges are data and which are holes. Member data is
never read; `TarMember.segments` turns a logical byte range into archive ranges and
holes, which is all a ``--filter=tar`` needs to serve a member as an export.

Header parsing is the standard library's `tarfile`, so every dialect it knows is
supported: v7, ustar, GNU (long names, long link targets, old-style sparse members),
POSIX pax (extended and global headers) and GNU sparse formats 0.0, 0.1 and 1.0 inside
pax. `tarfile` is blocking code, so `scan_tar` is too: it reads through a blocking
``read(offset, length)`` (a `BlockingRead`). To read through the async ``pread`` of a
layer of the chain, a filter runs it in a worker thread whose reads call back into Trio
(see ``trionbd/filters/_formats.py``). Because each such round trip costs tens of
microseconds, reads go through a read-ahead window that grows while the scan is
sequential (up to `MAX_WINDOW` bytes) and shrinks back after a seek, so skipping a large
member costs one small read and its data is never fetched.

What counts as a valid archive, and what does not:

- An archive ends at the end-of-archive marker (two zero blocks) or at end of file
  (GNU tar accepts a missing marker, so do we). Bytes after a complete marker are
  ignored, as GNU tar ignores them (an archive written to a larger block device).
- `tarfile` stops silently at an invalid header anywhere but offset 0. We do not: if it
  stops where the archive does not end, the header there is reported (bad checksum,
  truncated header, unparseable header), and a single zero block followed by more
  non-zero data is an error too, because the members after it would be lost.
- An archive made only of zero blocks (``tar cf e.tar --files-from /dev/null``) is
  valid and has no members. A 0-byte archive is an error ("not a tar archive"), as it is
  for GNU tar and for `tarfile`.
- Member data (and, for sparse members, the data their map claims) must lie inside the
  archive; a truncated archive is an error, never a short member.

Every failure is a `FormatError` whose message starts with the archive's name and gives
the byte offset of the offending header. Exceptions raised by ``read`` itself (and by
the ``on_header`` callback) propagate unchanged.

Names are normalized with `normalize_name`: leading ``/`` and ``./`` and empty or ``.``
components are dropped, so ``./etc//passwd`` is served as ``etc/passwd``. A member whose
name normalizes to nothing (the ``./`` entry of ``tar cf x.tar .``) is skipped. ``..``
components are kept as written in member names. When the same name appears twice the
later member wins, as it does when tar extracts. Names that are not valid UTF-8 are
decoded with ``surrogateescape`` (``name.encode("utf-8", "surrogateescape")`` gives the
original bytes back).

Links: a hard link names an earlier member by its archive path and stands for the member
of that name *preceding* it (as extraction would link to the file on disk at that
moment). A symbolic link is resolved like a path lookup in a chroot at the archive's
root: relative targets from the link's directory, absolute targets from the root,
symlinks in intermediate components followed, ``..`` at the root staying at the root,
at most `MAX_SYMLINK_HOPS` links per lookup. A link that cannot be resolved (dangling,
loop, pointing at a directory) is not an export; `TarIndex.lookup` explains why, and
the other members are unaffected.

Example::

    with open("disk-images.tar", "rb") as f:
        index = scan_tar(lambda offset, length: os.pread(f.fileno(), length, offset),
                         os.fstat(f.fileno()).st_size, name="disk-images.tar")
        member = index.lookup("images/root.img")
        for seg in member.segments(0, 65536):
            data = b"\\0" * seg.length if seg.archive_offset is None else os.pread(
                f.fileno(), seg.length, seg.archive_offset)
"""

from __future__ import annotations

import enum
import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn, cast

from trionbd.formats import BlockingRead, FormatError, map_range

BLOCK_SIZE = 512
"""Size of a tar header and the unit member data is padded to."""

MIN_WINDOW = 64 * 1024
"""Read-ahead after a seek (for example past a large member's data)."""

MAX_WINDOW = 1024 * 1024
"""Largest read-ahead window; windows double up to this while the scan is sequential."""

MAX_HEADER_BYTES = 64 * 1024 * 1024
"""Largest single metadata read (pax records, GNU long names, sparse maps) accepted."""

MAX_SYMLINK_HOPS = 40
"""Symbolic links followed while resolving one name, as Linux's MAXSYMLINKS."""

_ZERO_BLOCK = bytes(BLOCK_SIZE)


class TarLookupError(FormatError):
    """`TarIndex.lookup` could not give a regular member for a name."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name
        """The normalized name that was looked up."""


class TarNotFound(TarLookupError):
    """No member of that name (or a path through a missing directory)."""


class TarDanglingLink(TarNotFound):
    """The name is a hard or symbolic link whose target is not in the archive."""


class TarLinkLoop(TarLookupError):
    """Resolving the name followed more than `MAX_SYMLINK_HOPS` symbolic links."""


class TarNotRegular(TarLookupError):
    """The name (or its link target) is a directory, device, FIFO or other non-file."""

    def __init__(self, message: str, name: str, kind: MemberKind) -> None:
        super().__init__(message, name)
        self.kind = kind
        """What the name turned out to be."""


class MemberKind(enum.Enum):
    """What a tar member is; only `REGULAR` members are exports."""

    REGULAR = "regular file"
    HARDLINK = "hard link"
    SYMLINK = "symbolic link"
    DIRECTORY = "directory"
    CHARDEV = "character device"
    BLOCKDEV = "block device"
    FIFO = "FIFO"
    OTHER = "member of an unsupported type"


_KIND_BY_TYPE: dict[bytes, MemberKind] = {
    tarfile.LNKTYPE: MemberKind.HARDLINK,
    tarfile.SYMTYPE: MemberKind.SYMLINK,
    tarfile.DIRTYPE: MemberKind.DIRECTORY,
    b"D": MemberKind.DIRECTORY,  # GNU incremental dump directory
    tarfile.CHRTYPE: MemberKind.CHARDEV,
    tarfile.BLKTYPE: MemberKind.BLOCKDEV,
    tarfile.FIFOTYPE: MemberKind.FIFO,
}


def normalize_name(name: str) -> str:
    """Return the export name of a member (or a name being looked up).

    Leading slashes and empty or ``.`` components are removed: ``./a//b/`` becomes
    ``a/b``, and ``.`` or ``/`` become the empty string. ``..`` is kept as written.
    """
    return "/".join(part for part in name.split("/") if part and part != ".")


class Segment(NamedTuple):
    """A piece of a member's logical byte range.

    Logical bytes ``[offset, offset + length)`` of the member are the archive bytes
    ``[archive_offset, archive_offset + length)``, or zeros when ``archive_offset`` is
    None (a hole of a sparse member). A named tuple: made once or more per read, it costs
    half of what a frozen dataclass does.
    """

    offset: int
    length: int
    archive_offset: int | None


@dataclass(frozen=True)
class TarMember:
    """A regular member of an archive and where its data is.

    ``offset_data`` is where the member's stored data starts in the archive and
    ``stored_size`` how many bytes are stored there; ``size`` is the logical size. For a
    sparse member ``sparse`` lists the data regions as (logical offset, length) pairs in
    the order they are stored: the first region's bytes start at ``offset_data`` and each
    following region's bytes follow immediately. Everything outside the regions reads as
    zeros. For other members ``sparse`` is None and ``stored_size == size``.

    Construction checks that the sparse map is consistent (non-negative, inside
    ``size``, not overlapping) and raises `ValueError` otherwise.
    """

    name: str
    """Normalized archive name of the member that holds the data."""
    type: bytes
    """The tar type flag (``b"0"``, ``b"\\0"``, ``b"7"``, or ``b"S"`` for GNU sparse)."""
    header_offset: int
    """Offset of the member's first header block (including pax or long-name headers)."""
    offset_data: int
    size: int
    stored_size: int
    mode: int
    mtime: float
    """Seconds since the epoch; fractional when a pax header gave sub-second precision."""
    uid: int
    gid: int
    uname: str = ""
    gname: str = ""
    sparse: tuple[tuple[int, int], ...] | None = None
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _ends: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _sources: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size < 0 or self.stored_size < 0 or self.offset_data < 0:
            raise ValueError("negative size or offset")
        starts: list[int] = []
        ends: list[int] = []
        sources: list[int] = []
        if self.sparse is not None:
            stored = 0
            regions: list[tuple[int, int, int]] = []
            for start, length in self.sparse:
                if start < 0 or length < 0:
                    raise ValueError(f"sparse map has a negative entry ({start}, {length})")
                if start + length > self.size:
                    raise ValueError(
                        f"sparse region ({start}, {length}) extends past the member's "
                        f"size of {self.size} bytes"
                    )
                if length:
                    regions.append((start, length, self.offset_data + stored))
                stored += length
            if stored != self.stored_size:
                raise ValueError(
                    f"sparse map holds {stored} bytes but stored_size is {self.stored_size}"
                )
            regions.sort()
            for start, length, source in regions:
                if ends and start < ends[-1]:
                    raise ValueError(f"sparse region ({start}, {length}) overlaps another")
                if ends and start == ends[-1] and source == sources[-1] + ends[-1] - starts[-1]:
                    ends[-1] = start + length  # contiguous in both spaces: merge
                    continue
                starts.append(start)
                ends.append(start + length)
                sources.append(source)
        elif self.stored_size != self.size:
            raise ValueError("stored_size differs from size for a non-sparse member")
        object.__setattr__(self, "_starts", tuple(starts))
        object.__setattr__(self, "_ends", tuple(ends))
        object.__setattr__(self, "_sources", tuple(sources))

    def segments(self, offset: int, length: int) -> list[Segment]:
        """Map logical bytes ``[offset, offset + length)`` to archive ranges and holes.

        The segments are in order, contiguous and cover the range exactly; an empty
        range gives an empty list. Cost is O(log r + k) for r sparse regions and k
        segments returned. Raises `ValueError` for a range outside ``[0, size]``.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside member {self.name!r} "
                f"of {self.size} bytes"
            )
        if length == 0:
            return []
        if self.sparse is None:
            return [Segment(offset, length, self.offset_data + offset)]
        return map_range(self._starts, self._ends, self._sources, offset, offset + length, Segment)


# Nodes of the name tree built while scanning (a regular member is its own node); links
# are resolved after the scan.


@dataclass(frozen=True, slots=True)
class _Special:
    kind: MemberKind
    header_offset: int
    type: bytes


@dataclass(frozen=True, slots=True)
class _Symlink:
    target: str
    header_offset: int


@dataclass(frozen=True, slots=True)
class _HardLink:
    target: str
    header_offset: int
    node: TarMember | _Special | _Symlink | None
    """What the target name stood for when the link was read; None if nothing."""


_Node = TarMember | _Special | _Symlink | _HardLink


class TarIndex:
    """The exports of a tar archive: regular members and links that resolve to them.

    ``members`` maps each export name to its `TarMember`, in archive order (the
    position of the header that defined the name last). Link names map to the member
    they resolve to, whose ``name`` is the member holding the data. ``len(index)`` is
    the number of exports; iterating gives their names. Built by `read_tar_index`.
    """

    def __init__(self, archive: str, size: int, nodes: dict[str, _Node]) -> None:
        self.archive = archive
        """The archive's name, as used in messages."""
        self.size = size
        """The archive's size in bytes."""
        self._nodes = nodes
        dirs: set[str] = set()
        for key in nodes:
            parent = key.rpartition("/")[0]
            while parent and parent not in dirs:
                dirs.add(parent)
                parent = parent.rpartition("/")[0]
        self._dirs = frozenset(dirs)
        self.members: dict[str, TarMember] = {}
        for key, node in nodes.items():
            if isinstance(node, TarMember):
                self.members[key] = node
            elif not isinstance(node, _Special):
                try:
                    self.members[key] = self._resolve(key)
                except TarLookupError:
                    pass

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[str]:
        return iter(self.members)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize_name(name) in self.members

    def __repr__(self) -> str:
        return f"<TarIndex {self.archive!r}: {len(self.members)} exports>"

    def lookup(self, name: str) -> TarMember:
        """Return the regular member served under ``name`` (normalized first).

        Names that are not member names of the archive are resolved as paths too, so
        a path through a symlinked directory finds its file. Raises `TarNotFound`
        (`TarDanglingLink` for a link to a missing member), `TarLinkLoop`, or
        `TarNotRegular` ("is a directory, not a regular file") with ``kind`` set.
        """
        key = normalize_name(name)
        member = self.members.get(key)
        if member is not None:
            return member
        return self._resolve(key)

    def _where(self, path: str) -> str:
        node = self._nodes.get(path)
        if node is None:
            return ""
        return f" (header at offset {node.header_offset})"

    def _resolve(self, key: str) -> TarMember:
        archive = self.archive
        if not key:
            raise TarNotFound(f"{archive}: empty member name", key)
        done: list[str] = []
        pending = key.split("/")[::-1]
        hops = 0
        last_link: tuple[str, str] | None = None  # (link name, target) for messages
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            done.append(part)
            path = "/".join(done)
            node = self._nodes.get(path)
            if isinstance(node, _HardLink):
                if node.node is None:
                    raise TarDanglingLink(
                        f"{archive}: {path!r}{self._where(path)} is a hard link to "
                        f"{node.target!r}, which is not a member preceding it",
                        key,
                    )
                node = node.node
            if isinstance(node, _Symlink):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise TarLinkLoop(
                        f"{archive}: too many levels of symbolic links resolving {key!r} "
                        f"(more than {MAX_SYMLINK_HOPS}; a loop through {path!r}"
                        f"{self._where(path)}?)",
                        key,
                    )
                last_link = (path, node.target)
                done.pop()
                if node.target.startswith("/"):
                    done.clear()
                pending.extend(node.target.split("/")[::-1])
                continue
            if pending and not self._is_dir(path, node):
                # Like a path lookup: every component before the last is a directory.
                if node is None:
                    self._raise_missing(key, path, last_link)
                raise TarNotFound(
                    f"{archive}: cannot resolve {key!r}: {path!r}{self._where(path)} is not "
                    "a directory",
                    key,
                )
        path = "/".join(done)
        node = self._nodes.get(path)
        if isinstance(node, _HardLink):
            node = node.node  # not a symlink: the loop above already followed it
        if isinstance(node, TarMember):
            return node
        what = f"{key!r}" if path == key else f"{key!r} (resolved to {path!r})"
        if isinstance(node, _Special):
            kind = node.kind
            if kind is MemberKind.OTHER:
                detail = f"is a member of unsupported type {node.type!r}"
            else:
                detail = f"is a {kind.value}"
            raise TarNotRegular(
                f"{archive}: {what}{self._where(path)} {detail}, not a regular file", key, kind
            )
        if not path or path in self._dirs:
            raise TarNotRegular(
                f"{archive}: {what} is a directory, not a regular file",
                key,
                MemberKind.DIRECTORY,
            )
        self._raise_missing(key, path, last_link)

    def _is_dir(self, path: str, node: _Node | None) -> bool:
        if node is None:
            return path in self._dirs
        return isinstance(node, _Special) and node.kind is MemberKind.DIRECTORY

    def _raise_missing(self, key: str, path: str, last_link: tuple[str, str] | None) -> NoReturn:
        archive = self.archive
        what = f"{key!r}" if path == key else f"{key!r} ({path!r})"
        if last_link is not None:
            link, target = last_link
            raise TarDanglingLink(
                f"{archive}: {what}: symbolic link {link!r}{self._where(link)} points to "
                f"{target!r}, which is not in the archive",
                key,
            )
        raise TarNotFound(f"{archive}: no member named {what}", key)


class _ArchiveFile:
    """Read-only, seekable file object for `tarfile`, running in a worker thread.

    Reads are served from a read-ahead window fetched with ``read``.
    The window doubles (from `MIN_WINDOW` to `MAX_WINDOW`) while reads continue where
    the last window ended and falls back to `MIN_WINDOW` after a jump.
    """

    mode = "rb"

    def __init__(self, read: BlockingRead, size: int, archive: str) -> None:
        self._read = read
        self._size = size
        self._archive = archive
        self._pos = 0
        self._buf = b""
        self._buf_start = 0
        self._window = MIN_WINDOW
        self.error: Exception | None = None
        """The exception ``read`` (or ``on_header``) raised, if it did; it must reach the
        caller as is."""
        self.last_read = 0
        """Offset of the most recent read request."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self._pos
        elif whence == io.SEEK_END:
            pos += self._size
        if pos < 0:
            raise FormatError(f"{self._archive}: seek to negative offset {pos}")
        self._pos = pos
        return pos

    def write(self, data: bytes) -> int:
        raise io.UnsupportedOperation("the archive is read-only")

    def close(self) -> None:
        pass

    def read(self, n: int = -1) -> bytes:
        pos = self._pos
        self.last_read = pos
        if n < 0:
            # tarfile only reads known lengths; a negative one comes from a corrupt size.
            raise FormatError(
                f"{self._archive}: invalid header before offset {pos}: negative size field"
            )
        if n > MAX_HEADER_BYTES:
            raise FormatError(
                f"{self._archive}: header data of {n} bytes at offset {pos} exceeds the "
                f"limit of {MAX_HEADER_BYTES} bytes (corrupt size field?)"
            )
        n = max(0, min(n, self._size - pos))
        if n == 0:
            return b""
        start = pos - self._buf_start
        if start < 0 or start + n > len(self._buf):
            self._fill(pos, n)
            start = 0
        self._pos = pos + n
        return self._buf[start : start + n]

    def _fill(self, pos: int, n: int) -> None:
        buf_end = self._buf_start + len(self._buf)
        if self._buf and self._buf_start <= pos <= buf_end:
            self._window = min(MAX_WINDOW, self._window * 2)
        else:
            self._window = MIN_WINDOW
        length = min(max(n, self._window), self._size - pos)
        try:
            data = self._read(pos, length)
        except Exception as exc:
            self.error = exc
            raise
        if len(data) != length:
            raise FormatError(
                f"{self._archive}: short read at offset {pos}: asked for {length} bytes, "
                f"got {len(data)} (archive shorter than its size of {self._size} bytes?)"
            )
        self._buf = bytes(data)
        self._buf_start = pos

    def read_at(self, pos: int, n: int) -> bytes:
        self.seek(pos)
        return self.read(n)


def _stored_size(info: tarfile.TarInfo) -> int:
    sparse = cast("list[tuple[int, int]] | None", info.sparse)
    if sparse is None:
        return info.size
    return sum(length for _, length in sparse)


def _make_node(info: tarfile.TarInfo, key: str, archive: str) -> _Node:
    header = info.offset
    if info.isreg():
        sparse = cast("list[tuple[int, int]] | None", info.sparse)
        try:
            return TarMember(
                name=key,
                type=info.type,
                header_offset=header,
                offset_data=info.offset_data,
                size=info.size,
                stored_size=_stored_size(info),
                mode=info.mode,
                mtime=info.mtime,
                uid=info.uid,
                gid=info.gid,
                uname=info.uname,
                gname=info.gname,
                sparse=None if sparse is None else tuple((int(a), int(b)) for a, b in sparse),
            )
        except (ValueError, TypeError) as exc:
            raise FormatError(
                f"{archive}: member {key!r} (header at offset {header}): {exc}"
            ) from None
    if info.issym():
        return _Symlink(info.linkname, header)
    kind = _KIND_BY_TYPE.get(info.type, MemberKind.OTHER)
    if kind is MemberKind.HARDLINK:
        raise AssertionError("hard links are handled by the caller")
    return _Special(kind, header, info.type)


def _check_member(
    info: tarfile.TarInfo, key: str, next_header: int, size: int, archive: str
) -> None:
    """Check that a member's header sequence advances and its data is in the archive."""
    header = info.offset
    label = f"member {key or info.name!r} (header at offset {header})"
    if info.size < 0:
        raise FormatError(f"{archive}: {label} has a negative size ({info.size})")
    if next_header <= header:
        raise FormatError(f"{archive}: {label}: next header offset {next_header} does not advance")
    if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES:
        stored = _stored_size(info)
        end = info.offset_data + stored
        if end > size:
            raise FormatError(
                f"{archive}: truncated archive: {label} has {stored} bytes of data at offset "
                f"{info.offset_data}, past the end of the archive ({size} bytes)"
            )
        if end > next_header:
            raise FormatError(
                f"{archive}: {label}: its data ({stored} bytes at offset {info.offset_data}) "
                f"runs into the next header at offset {next_header} (corrupt sparse map?)"
            )


def _check_end(reader: _ArchiveFile, offset: int, size: int, archive: str) -> None:
    """`tarfile` stopped at ``offset``: make sure the archive really ends there."""
    if offset >= size:
        return
    block = reader.read_at(offset, BLOCK_SIZE)
    if len(block) < BLOCK_SIZE:
        if block.count(0) == len(block):
            return  # zero padding shorter than a block: nothing is lost
        raise FormatError(
            f"{archive}: truncated header at offset {offset}: only {len(block)} of "
            f"{BLOCK_SIZE} bytes before the end of the archive"
        )
    if block == _ZERO_BLOCK:
        after = reader.read_at(offset + BLOCK_SIZE, BLOCK_SIZE)
        if after.count(0) == len(after):
            return  # end-of-archive marker (or a lone zero block at end of file)
        raise FormatError(
            f"{archive}: lone zero block at offset {offset} followed by non-zero data at "
            f"offset {offset + BLOCK_SIZE} (corrupt header?)"
        )
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise _header_error(archive, str(exc), offset) from None
    raise FormatError(f"{archive}: invalid member header at offset {offset}")


def _header_error(archive: str, problem: str, offset: int) -> FormatError:
    """Turn one of tarfile's header messages into ours."""
    if problem == "bad checksum":
        return FormatError(f"{archive}: bad header checksum at offset {offset}")
    if problem == "invalid header":
        return FormatError(
            f"{archive}: invalid header at offset {offset}: a number field is not octal "
            "(corrupt header, or not a tar archive)"
        )
    return FormatError(f"{archive}: {problem} at offset {offset}")


def scan_tar(
    read: BlockingRead,
    size: int,
    *,
    name: str = "archive",
    on_header: Callable[[int], None] | None = None,
) -> TarIndex:
    """Read the headers of the tar archive of ``size`` bytes behind ``read``; member data
    is never read. ``name`` names the archive in error messages. ``on_header(n)`` is
    called before each header with the number of members read so far: to show progress,
    or to stop the scan by raising.

    Raises `FormatError` (message: archive name, problem, byte offset) for anything
    that is not a valid archive; exceptions from ``read`` and ``on_header`` propagate
    unchanged.
    """
    if size < 0:
        raise ValueError(f"negative archive size {size}")
    archive = name
    reader = _ArchiveFile(read, size, archive)
    if size == 0:
        raise FormatError(f"{archive}: empty file (0 bytes), not a tar archive")
    nodes: dict[str, _Node] = {}
    header_at = 0
    members = 0
    try:
        tar = tarfile.TarFile(fileobj=reader, mode="r", encoding="utf-8")
        while True:
            if on_header is not None:
                try:
                    on_header(members)
                except Exception as exc:
                    reader.error = exc
                    raise
            header_at = tar.offset
            info = tar.next()
            if info is None:
                break
            members += 1
            key = normalize_name(info.name)
            _check_member(info, key, tar.offset, size, archive)
            if not key:
                continue
            node: _Node
            if info.islnk():
                target = nodes.get(normalize_name(info.linkname))
                if isinstance(target, _HardLink):
                    target = target.node
                node = _HardLink(info.linkname, info.offset, target)
            else:
                node = _make_node(info, key, archive)
            nodes.pop(key, None)
            nodes[key] = node
        _check_end(reader, tar.offset, size, archive)
    except (FormatError, MemoryError):
        raise
    except Exception as exc:
        if reader.error is not None:
            if exc is reader.error:
                raise
            raise reader.error from None
        if isinstance(exc, tarfile.ReadError) and str(exc) == "unexpected end of data":
            raise FormatError(
                f"{archive}: truncated archive: the member before offset {header_at} ends "
                f"past the end of the archive ({size} bytes)"
            ) from None
        # tarfile's own header errors (at offset 0, or in the header after a pax or GNU
        # long-name header): the failing header is the last one read.
        if isinstance(exc, tarfile.TarError) and str(exc) in (
            "bad checksum",
            "invalid header",
            "truncated header",
        ):
            raise _header_error(archive, str(exc), max(header_at, reader.last_read)) from None
        if isinstance(exc, tarfile.TarError) and str(exc) in ("empty header", "end of file header"):
            raise FormatError(
                f"{archive}: the extended header at offset {header_at} is not followed by a "
                f"member header (end of archive or zero block at offset {reader.last_read})"
            ) from None
        detail = f"{type(exc).__name__}: {exc}"
        if len(detail) > 200:
            detail = detail[:200] + "..."
        raise FormatError(
            f"{archive}: malformed header at offset {header_at} (pax record, long name or "
            f"sparse map; last read at offset {reader.last_read}): {detail}"
        ) from None
    return TarIndex(archive, size, nodes)


__all__ = [
    "BLOCK_SIZE",
    "MAX_HEADER_BYTES",
    "MAX_SYMLINK_HOPS",
    "MAX_WINDOW",
    "MIN_WINDOW",
    "MemberKind",
    "Segment",
    "TarDanglingLink",
    "TarIndex",
    "TarLinkLoop",
    "TarLookupError",
    "TarMember",
    "TarNotFound",
    "TarNotRegular",
    "normalize_name",
    "scan_tar",
]
