"""The s3 plugin (alias S3) against moto's S3 server: one object, every object under a
prefix (streamed, paginated, through the tar filter), and the writable disk made of
objects in nbdkit's layout, checked with real clients byte for byte and against nbdkit's
own S3 plugin both ways."""

from __future__ import annotations

import json
import random
import re
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.remote.conftest import make_tar, tar_members
from tests.remote.servers import Moto
from tests.support import (
    export_info,
    libnbd_python,
    listing,
    nbdkit_process,
    nbdsh,
    read_export,
    run,
    trionbd_exit,
    trionbd_process,
)
from trionbd.chain import Chain
from trionbd.nursery import open_lifetime
from trionbd.plugins.s3 import S3Plugin, partial_pieces, pieces

pytestmark = pytest.mark.usefixtures("aws_env")

KiB = 1 << 10
MiB = 1 << 20


def bucket(moto: Moto) -> tuple[Any, str]:
    """A new bucket: (boto3 client, name)."""
    client = moto.client()
    name = f"b-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return client, name


def s3(moto: Moto, name: str, *args: str) -> Any:
    return trionbd_process("s3", f"bucket={name}", f"endpoint-url={moto.endpoint}", *args)


def keys(client: Any, name: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def gets(moto: Moto, name: str, key: str) -> list[int]:
    """Statuses of moto's answers to GETs of ``name/key``."""
    pattern = re.compile(rf'GET /{re.escape(name)}/{re.escape(key)} HTTP/1\.1\S*" (\d+)')
    return [int(m.group(1)) for m in pattern.finditer(moto.log.read_text())]


# --- one object ----------------------------------------------------------------------------


@pytest.mark.parametrize("plugin", ["s3", "S3"])
def test_one_object_byte_for_byte(plugin: str, moto: Moto, tmp_path: Path) -> None:
    client, name = bucket(moto)
    data = random.Random(1).randbytes(3 * MiB + 777)
    client.put_object(Bucket=name, Key="images/disk.img", Body=data)
    args = (plugin, f"bucket={name}", "key=images/disk.img", f"endpoint-url={moto.endpoint}")
    with trionbd_process(*args) as server:
        info = export_info(server.uri)
        assert info["export-size"] == len(data)
        assert info["is_read_only"] is True and info["can_multi_conn"] is True
        assert read_export(server.uri, tmp_path) == data
        source = tmp_path / "source.img"
        source.write_bytes(data)
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri, str(source)])
    assert set(gets(moto, name, "images/disk.img")) == {206}  # range GETs only


def test_a_missing_object_or_bucket_fails_start_up(moto: Moto) -> None:
    _, name = bucket(moto)
    result = trionbd_exit("s3", f"bucket={name}", "key=nothing", f"endpoint-url={moto.endpoint}")
    assert result.returncode == 1
    assert "'nothing'" in result.stderr and "does not exist" in result.stderr
    result = trionbd_exit("s3", "bucket=no-such-bucket", f"endpoint-url={moto.endpoint}")
    assert result.returncode == 1
    assert "NoSuchBucket" in result.stderr


# --- every object under a prefix -----------------------------------------------------------

ODD_NAMES = ["a b+c.img", "café/ü.bin", "x/../y.img", "deep/er/z", "100%.img", "tilde~"]


def test_prefix_lists_objects_by_relative_name(moto: Moto, tmp_path: Path) -> None:
    client, name = bucket(moto)
    rng = random.Random(2)
    data = {n: rng.randbytes(rng.randrange(1, 70_000)) for n in ODD_NAMES}
    for n, body in data.items():
        client.put_object(Bucket=name, Key=f"2026/{n}", Body=body)
    client.put_object(Bucket=name, Key="2026/folder/", Body=b"")  # a folder marker
    client.put_object(Bucket=name, Key="2025/other.img", Body=b"elsewhere")
    with s3(moto, name, "prefix=2026/") as server:
        exports = listing(server.uri)
        assert [e["export-name"] for e in exports] == sorted(data)  # S3's key order
        for e in exports:
            assert e["description"] == f"object, {len(data[e['export-name']])} bytes"
            assert e["export-size"] == len(data[e["export-name"]])
        for n, body in data.items():
            assert read_export(server.uri_for(n), tmp_path) == body
        # The default export is the first key.
        assert read_export(server.uri, tmp_path) == data[sorted(data)[0]]
        out = libnbd_python(
            textwrap.dedent(f"""
                import nbd
                h = nbd.NBD()
                try:
                    h.connect_uri({server.uri_for("no-such.img")!r})
                except nbd.Error as e:
                    print("refused", e.string)
            """)
        )
        assert out.startswith("refused")
    with s3(moto, name) as server:  # the whole bucket
        names = [e["export-name"] for e in listing(server.uri)]
    assert names == ["2025/other.img", *(f"2026/{n}" for n in sorted(data))]


def put_many(client: Any, name: str, count: int) -> None:
    """Objects k00000, k00001, ... of one byte each."""
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=name, Key=f"k{i:05d}", Body=b"x"), range(count)
            )
        )


LIST = """
import nbd, sys
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.opt_list(lambda name, description: print(name))
h.opt_abort()
"""


def test_listing_pages_through_2100_keys(moto: Moto) -> None:
    client, name = bucket(moto)
    put_many(client, name, 2100)
    with s3(moto, name) as server:
        names = run(["/usr/bin/python3", "-c", LIST, server.uri]).split()
    assert names == [f"k{i:05d}" for i in range(2100)]
    # Three pages of 1000 keys (and a one-key listing at start-up).
    assert moto.requests(f"/{name}/?", "max-keys=1000") == 3


async def test_the_list_streams_page_by_page(moto: Moto) -> None:
    client, name = bucket(moto)
    put_many(client, name, 1001)
    plugin = S3Plugin(
        bucket=name, endpoint_url=moto.endpoint, access_key="testing", secret_key="testing"
    )
    plugin.get_ready()
    async with open_lifetime(Chain(plugin)):
        before = moto.requests(f"/{name}/?")  # after_fork lists one key
        exports = await plugin.list_exports(False, False)
        iterator = aiter(exports)  # type: ignore[arg-type]
        first = await anext(iterator)
        assert first.name == "k00000"
        assert moto.requests(f"/{name}/?") == before + 1  # one page so far
        rest = [e.name async for e in iterator]
        assert len(rest) == 1000
        assert moto.requests(f"/{name}/?") == before + 2


def test_tar_archives_under_a_prefix(moto: Moto, tmp_path: Path) -> None:
    client, name = bucket(moto)
    rng = random.Random(5)
    archives = {f"set{i}.tar": tar_members(rng, 6, prefix=f"s{i}/") for i in range(3)}
    for archive, members in archives.items():
        client.put_object(Bucket=name, Key=f"backups/{archive}", Body=make_tar(members))
    client.put_object(Bucket=name, Key="backups/notes.txt", Body=b"not an archive" * 100)
    with s3(moto, name, "prefix=backups/", "--filter=tar") as server:
        exports = {e["export-name"]: e for e in listing(server.uri)}
        expected = {f"{a}/{m}": data for a, ms in archives.items() for m, data in ms.items()}
        assert set(exports) == set(expected)
        for export, data in expected.items():
            assert exports[export]["export-size"] == len(data)
            assert read_export(server.uri_for(export), tmp_path) == data
    for archive in archives:
        assert set(gets(moto, name, f"backups/{archive}")) == {206}  # nothing read whole


# --- the disk made of objects --------------------------------------------------------------


def disk_args(size: str = "4M", object_size: str = "64K") -> tuple[str, ...]:
    return ("key=disk", f"size={size}", f"object-size={object_size}")


def test_disk_writes_reads_and_is_sparse(moto: Moto, tmp_path: Path) -> None:
    client, name = bucket(moto)
    image = bytearray(random.Random(7).randbytes(4 * MiB))
    image[MiB : 2 * MiB] = bytes(MiB)  # nbdcopy writes this as zeroes: no objects
    source = tmp_path / "in.img"
    source.write_bytes(image)
    with s3(moto, name, *disk_args()) as server:
        info = export_info(server.uri)
        assert info["is_read_only"] is False and info["can_multi_conn"] is True
        assert info["can_fua"] is True and info["can_trim"] is True
        assert info["block_size_preferred"] == 64 * KiB
        assert run(["nbdinfo", "--map", "--json", server.uri]).count('"type": 3') == 1
        run(["nbdcopy", str(source), server.uri])
        assert read_export(server.uri, tmp_path) == image
        stored = keys(client, name, "disk/")
        assert len(stored) == 48
        assert stored[0] == "disk/0000000000000000" and "disk/0000000000000010" not in stored
        assert run(["nbdinfo", "--map", server.uri]).split() == [
            "0", str(MiB), "0", "data",
            str(MiB), str(MiB), "3", "hole,zero",
            str(2 * MiB), str(2 * MiB), "0", "data",
        ]  # fmt: skip
        # Partial writes (read-modify-write), FUA, flush, across object boundaries.
        nbdsh(server.uri, textwrap.dedent("""
            h.pwrite(b"a" * 100, 65500, nbd.CMD_FLAG_FUA)
            h.pwrite(b"b" * 200_000, 1048576 - 1000)
            h.flush()
        """))  # fmt: skip
        image[65500:65600] = b"a" * 100
        image[MiB - 1000 : MiB + 199_000] = b"b" * 200_000
        assert read_export(server.uri, tmp_path) == image


def test_trim_and_zero_delete_whole_objects(moto: Moto, tmp_path: Path) -> None:
    client, name = bucket(moto)
    image = bytearray(random.Random(8).randbytes(MiB))
    source = tmp_path / "in.img"
    source.write_bytes(image)
    with s3(moto, name, *disk_args("1M")) as server:
        run(["nbdcopy", str(source), server.uri])
        assert len(keys(client, name, "disk/")) == 16
        out = nbdsh(server.uri, textwrap.dedent("""
            O = 65536
            h.trim(2 * O + 100, 2 * O - 100)   # objects 2 and 3 whole, 1 in part (kept)
            h.zero(2 * O, 10 * O + 500)        # 11 whole, 10 and 12 in part
            try:
                h.zero(3000, 1000, nbd.CMD_FLAG_FAST_ZERO)
            except nbd.Error as e:
                print("fast zero:", e.errno)
            h.zero(O, 14 * O, nbd.CMD_FLAG_NO_HOLE)  # zeroes stored in object 14
        """))  # fmt: skip
        assert out.strip() == "fast zero: ENOTSUP"
        o = 65536
        image[2 * o : 4 * o] = bytes(2 * o)
        image[10 * o + 500 : 12 * o + 500] = bytes(2 * o)
        image[14 * o : 15 * o] = bytes(o)
        stored = [int(k.split("/")[1], 16) for k in keys(client, name, "disk/")]
        assert stored == [0, 1, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15]
        assert read_export(server.uri, tmp_path) == image


def test_concurrent_partial_writes_to_one_object_lose_nothing(moto: Moto) -> None:
    """Four connections write 512-byte blocks interleaved over four 64 KiB objects, all
    at once: every block is a read-modify-write of an object others modify too."""
    client, name = bucket(moto)
    script = textwrap.dedent("""
        import nbd, sys
        uri = sys.argv[1]
        handles = []
        for c in range(4):
            h = nbd.NBD()
            h.connect_uri(uri)
            handles.append(h)
        for i in range(512):
            h = handles[i % 4]
            h.aio_pwrite(bytes([i % 251 + 1]) * 512, i * 512)
        for h in handles:
            while h.aio_in_flight():
                h.poll(-1)
        data = handles[0].pread(512 * 512, 0)
        print(all(data[i * 512 : (i + 1) * 512] == bytes([i % 251 + 1]) * 512 for i in range(512)))
        for h in handles:
            h.shutdown()
    """)
    with s3(moto, name, *disk_args("256K")) as server:
        assert run(["/usr/bin/python3", "-c", script, server.uri]).strip() == "True"
    assert len(keys(client, name, "disk/")) == 4


def test_fio_random_writes_verify(moto: Moto) -> None:
    """fio writes 4 KiB blocks at random, 16 at a time, into 64 KiB objects (each a
    read-modify-write), then reads every block back and checks its crc32c."""
    _, name = bucket(moto)
    with s3(moto, name, *disk_args("2M")) as server:
        out = run(
            ["fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite",
             "--bs=4k", "--size=2M", "--iodepth=16", "--verify=crc32c", "--verify_state_save=0",
             "--output-format=json"]
        )  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == job["read"]["io_bytes"] == 2 * MiB


def test_nbdkit_s3_and_trionbd_share_disks_both_ways(moto: Moto, tmp_path: Path) -> None:
    client, name = bucket(moto)
    image = bytearray(random.Random(9).randbytes(2 * MiB))
    image[MiB : MiB + 256 * KiB] = bytes(256 * KiB)
    source = tmp_path / "in.img"
    source.write_bytes(image)
    # nbdkit's S3 plugin wants object-size <= 64K (its minimum block size).
    args = (f"bucket={name}", f"endpoint-url={moto.endpoint}", *disk_args("2M"))
    with nbdkit_process("S3", *args) as nbdkit:
        run(["nbdcopy", str(source), nbdkit.uri])
    with trionbd_process("s3", *args) as server:
        assert read_export(server.uri, tmp_path) == image
        nbdsh(server.uri, 'h.pwrite(b"t" * 70_000, 100_000); h.zero(65536 * 4, 65536 * 20)')
    image[100_000:170_000] = b"t" * 70_000
    image[65536 * 20 : 65536 * 24] = bytes(65536 * 4)
    assert "disk/0000000000000015" not in keys(client, name, "disk/")
    with nbdkit_process("S3", *args) as nbdkit:
        assert read_export(nbdkit.uri, tmp_path) == image


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (("key=k",), "parameter 'bucket' is required"),
        (("bucket=b", "key=k", "prefix=p"), "key= or prefix=, not both"),
        (("bucket=b", "key=k", "size=1M"), "size= and object-size= go together"),
        (("bucket=b", "size=1M", "object-size=64K"), "needs key="),
        (("bucket=b", "key=k", "size=100K", "object-size=64K"), "not a multiple of object-size"),
        (("bucket=b", "access-key=a"), "access-key= and secret-key= go together"),
        (("bucket=b", "addressing=sideways"), "is not one of path, virtual"),
        (("bucket=b", "endpoint-url=ftp://x"), "is not an http:// or https:// URL"),
        (("bucket=b", "nosuch=1"), "unknown parameter 'nosuch'"),
        (("bucket=b", "profile=no-such-profile"), "no-such-profile"),
    ],
)
def test_bad_parameters_exit_2(args: tuple[str, ...], message: str) -> None:
    result = trionbd_exit("s3", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_pieces() -> None:
    rng = random.Random(4)
    for _ in range(3000):
        size = rng.choice([1, 3, 512, 4096])
        offset, count = rng.randrange(10 * size), rng.randrange(20 * size)
        parts = list(pieces(offset, count, size))
        assert sum(p.length for p in parts) == count
        assert all(size * p.index + p.start == offset + p.pos for p in parts)
        assert [p for p in parts if not p.whole] == partial_pieces(offset, count, size)
