"""Read-only reader of ext2, ext3 and ext4 filesystem images.

:class:`Ext2FS` parses an image through an async ``pread(offset, length)`` callable (see
:data:`trionbd.formats.Pread`): the superblock, group descriptors, inodes, block maps
(direct, indirect, double and triple indirect), extent trees of any depth, inline data,
symbolic links, and linear and hash-indexed (htree) directories.  It resolves paths,
lists every regular file, and gives each file's logical-to-physical map
(:class:`FileMap`) so a caller can serve the file's bytes straight from the image.

Guarantees:

* Every problem with the image raises :class:`~trionbd.formats.FormatError` (or one of the
  subclasses below) whose message names the structure, the inode number, the block or
  byte offset and, for an unsupported feature, the feature's name.  Nothing else escapes
  from parsing (a failing ``pread`` itself propagates unchanged; a negative offset or
  length passed to :meth:`FileMap.lookup` or :meth:`Ext2FS.read` is a ValueError).  No
  read is ever issued outside ``[0, size)``, and corrupt pointers cannot make the reader
  loop or grow without bound: tree depths are bounded, directory cycles are detected,
  and a file whose map uses more blocks than the file system has is refused.
* Features that change how data must be read and that this reader does not implement
  (unknown INCOMPAT bits, compression, encryption, ``dirdata``, a journal that still
  needs recovery unless explicitly allowed) are refused at :meth:`Ext2FS.open` with
  :class:`Ext2Unsupported`.  Features that only matter to writers (unknown RO_COMPAT
  bits, ...) are reported in :attr:`Ext2FS.read_only_reason`.
* With ``metadata_csum`` the crc32c of every superblock, group descriptor, inode, extent
  tree block and directory block (leaf tail and htree tail) that is read is verified;
  with ``uninit_bg`` (``gdt_csum``) the crc16 of each group descriptor is verified.
  A mismatch raises :class:`Ext2ChecksumError`.
* Reads are batched: inode tables are read in chunks of :data:`ITABLE_CHUNK_BYTES`,
  directories in runs of up to :data:`MAX_PREAD_BYTES`, and the blocks of one level of an
  extent tree or block map with one ``pread`` per physically contiguous run.  Metadata is
  cached in bounded LRU caches, so memory stays bounded on any image.
* A lookup in a hash-indexed directory reads the htree root, its interior nodes and the
  leaf (or leaves, on a hash collision) it needs, never the whole directory.  Linear
  directories are scanned, and small ones (:data:`DIR_CACHE_MAX_BYTES`) remembered.

Limitations: the journal is never replayed (a ``needs_recovery`` image opened with
``allow_needs_recovery=True`` shows the pre-journal state); extended attributes other than
the in-inode ``system.data`` are not read; in a casefolded directory a name is found only
by its exact bytes (linear scan, no Unicode folding); SipHash-indexed directories
(casefold + encrypt) are scanned linearly.

The reader is plain ``async def`` code with no Trio imports and no threads.  Its parts,
one module each: ``superblock`` (feature flags and geometry), ``checksums`` (crc32c,
crc16 and the directory hashes), ``inodes`` (checked reads, group descriptors, inode
tables), ``maps`` (block maps and extent trees), ``directories`` (linear and htree) and
``filesystem`` (:class:`Ext2FS`, the facade); ``errors`` holds the exceptions.

Example::

    fs = await Ext2FS.open(pread, size)
    inode = await fs.resolve_regular("/images/disk.img")
    fmap = await fs.extents(inode.ino)
    for seg in fmap.lookup(0, 65536):
        ...   # seg.physical is a byte offset in the image, or None for zeros
"""

from .checksums import HashVersion, dx_hash
from .directories import DirEntry
from .errors import (
    Ext2ChecksumError,
    Ext2NotADirectory,
    Ext2NotFound,
    Ext2NotRegularFile,
    Ext2SymlinkLoop,
    Ext2Unsupported,
)
from .filesystem import MAX_SYMLINK_FOLLOWS, Ext2FS
from .inodes import Inode
from .maps import FileMap, Segment
from .superblock import Features

__all__ = [
    "MAX_SYMLINK_FOLLOWS",
    "DirEntry",
    "Ext2ChecksumError",
    "Ext2FS",
    "Ext2NotADirectory",
    "Ext2NotFound",
    "Ext2NotRegularFile",
    "Ext2SymlinkLoop",
    "Ext2Unsupported",
    "Features",
    "FileMap",
    "HashVersion",
    "Inode",
    "Segment",
    "dx_hash",
]
