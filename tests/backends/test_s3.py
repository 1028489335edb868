"""The S3 backend against a real (moto) S3 server: the conformance suite plus S3 specifics."""

from __future__ import annotations

import concurrent.futures
import errno
import io
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from omnifs.backends.base import Backend, SetAttrs
from omnifs.backends.s3 import S3Backend
from omnifs.errors import (
    BackendUnavailable,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    OmniError,
    TransientError,
)
from tests.backends.conformance import BackendConformance, BoundedReader, blob
from tests.fixtures_s3 import MotoServer, RemoteSpec, free_port, make_s3_backend

pytest.importorskip("boto3")

MiB = 1 << 20
# Small multipart settings keep moto fast; 5 MiB is S3's minimum part size.
SMALL_PARTS = {"multipart_threshold": 5 * MiB, "part_size": 5 * MiB}


class TestS3Backend(BackendConformance):
    @pytest.fixture
    def backend_factory(self, s3_remote: RemoteSpec) -> Callable[[], Backend]:
        return lambda: make_s3_backend(s3_remote)


def run(backend: S3Backend, fn: Callable[[S3Backend], Awaitable[Any]]) -> Any:
    """Run ``fn(backend)`` in trio and close the backend afterwards."""

    async def main() -> Any:
        try:
            return await fn(backend)
        finally:
            await backend.aclose()

    return trio.run(main)


def keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


async def put(b: Backend, path: str, data: bytes, attrs: SetAttrs | None = None) -> Any:
    return await b.write(path, io.BytesIO(data), attrs)


# --- configuration ---------------------------------------------------------------------------------


def test_from_url_and_describe() -> None:
    b = S3Backend.from_url("r", "s3://my-bucket/some/prefix/")
    assert (b.bucket, b.prefix) == ("my-bucket", "some/prefix")
    assert b.describe() == "s3://my-bucket/some/prefix"
    assert S3Backend("r", "bkt", secret_access_key="hunter2").describe() == "s3://bkt"
    public = {k for k, o in S3Backend.options.items() if not o.secret}
    assert public == {"bucket", "prefix", "endpoint_url", "region", "addressing_style", "profile"}
    assert {k for k, o in S3Backend.options.items() if o.secret} == {
        "access_key_id",
        "secret_access_key",
        "session_token",
    }
    assert S3Backend.options["bucket"].required


def test_prefix_maps_to_keys(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]
    s3_client.put_object(Bucket=bucket, Key="outside", Body=b"o")

    async def t(b: S3Backend) -> None:
        assert await b.list("") == []
        await b.mkdir("d")
        await put(b, "d/f.txt", b"hello")
        assert [i.name for i in await b.list("")] == ["d"]
        assert (await b.stat("")).is_dir

    run(make_s3_backend(s3_remote, prefix="base/sub"), t)
    assert keys(s3_client, bucket) == ["base/sub/d/", "base/sub/d/f.txt", "outside"]


# --- directories and key mapping ---------------------------------------------------------------------


def test_implicit_directories(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]
    for key in ("a/b/c.txt", "a/d.txt"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")

    async def t(b: S3Backend) -> None:
        assert [(i.name, i.kind) for i in await b.list("")] == [("a", "dir")]
        assert [(i.name, i.kind) for i in await b.list("a")] == [("b", "dir"), ("d.txt", "file")]
        assert (await b.stat("a/b")).is_dir
        await put(b, "a/b/new", b"n")  # the parent is an implicit directory
        await b.delete("a/b/c.txt")
        await b.delete("a/b/new")
        # Deleting the last object keeps the directory (a marker is written).
        assert (await b.stat("a/b")).is_dir
        assert await b.list("a/b") == []
        await b.rmdir("a/b")
        with pytest.raises(NotFound):
            await b.stat("a/b")
        with pytest.raises(NotEmpty):
            await b.rmdir("a")

    run(make_s3_backend(s3_remote), t)
    assert keys(s3_client, bucket) == ["a/d.txt"]


def test_marker_directories(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]
    s3_client.put_object(Bucket=bucket, Key="foreign/", Body=b"")  # a marker made by another tool

    async def t(b: S3Backend) -> None:
        await b.mkdir("m", SetAttrs(mode=0o700, uid=1000, gid=1000))
        st = await b.stat("m")
        assert st.is_dir and st.mode == 0o700 and st.uid == 1000
        assert await b.list("m") == []
        assert (await b.stat("foreign")).is_dir
        assert [(i.name, i.kind) for i in await b.list("")] == [("foreign", "dir"), ("m", "dir")]
        await b.set_attrs("m", SetAttrs(mode=0o755))
        assert (await b.stat("m")).mode == 0o755
        await b.rmdir("foreign")

    run(make_s3_backend(s3_remote), t)
    head = s3_client.head_object(Bucket=bucket, Key="m/")
    assert head["Metadata"]["omnifs-mode"] == "755"
    assert keys(s3_client, bucket) == ["m/"]


def test_unusable_keys_are_skipped(s3_remote: RemoteSpec, s3_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    bucket = s3_remote.config["bucket"]
    bad = ["dbl//slash", "x/../y", "./dot", "long/" + "z" * 256]
    for key in [*bad, "good", "long/fine", "both", "both/inside"]:
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"v")

    async def t(b: S3Backend) -> None:
        listed = [(i.name, i.kind) for i in await b.list("")]
        assert listed == [("both", "file"), ("dbl", "dir"), ("good", "file"), ("long", "dir"), ("x", "dir")]
        assert await b.list("dbl") == []
        assert await b.list("x") == []
        assert [i.name for i in await b.list("long")] == ["fine"]
        assert await b.read("good", 0, 10) == b"v"

    with caplog.at_level(logging.WARNING, logger="omnifs.backends.s3"):
        run(make_s3_backend(s3_remote), t)
    warned = caplog.text
    assert "dbl//" in warned and "x/../" in warned and "z" * 256 in warned and "both" in warned


def test_write_errors(s3_remote: RemoteSpec) -> None:
    async def t(b: S3Backend) -> None:
        await put(b, "f", b"x")
        with pytest.raises(NotADirectory):
            await put(b, "f/child", b"x")
        with pytest.raises(NotFound):
            await b.read("missing", 0, 1)
        await b.rename("f", "f")  # a no-op
        assert await b.read("f", 0, 1) == b"x"
        await b.mkdir("d")
        with pytest.raises(InvalidArgument):
            await b.rename("d", "d/e")
        with pytest.raises(IsADirectory):
            await b.read("d", 0, 1)

    run(make_s3_backend(s3_remote), t)


# --- data and metadata --------------------------------------------------------------------------------


def test_multipart_upload(s3_remote: RemoteSpec, s3_client: Any) -> None:
    data = blob(17 * MiB + 123, seed=3)

    async def t(b: S3Backend) -> None:
        src = BoundedReader(data, max_read=2 * MiB)  # not seekable: size unknown in advance
        info = await b.write("big.bin", src)  # type: ignore[arg-type]
        assert info.size == len(data) and info.etag and info.etag.endswith("-4")
        assert await b.read("big.bin", 0, 1000) == data[:1000]
        assert await b.read("big.bin", 10 * MiB - 7, 100) == data[10 * MiB - 7 : 10 * MiB + 93]
        assert await b.read("big.bin", len(data) - 50, 100) == data[-50:]
        seekable = await b.write("big2.bin", io.BytesIO(data[: 11 * MiB]))
        assert seekable.etag and seekable.etag.endswith("-3")

    run(make_s3_backend(s3_remote, **SMALL_PARTS), t)
    head = s3_client.head_object(Bucket=s3_remote.config["bucket"], Key="big.bin")
    assert head["ContentLength"] == len(data)


def test_failed_upload_is_aborted(s3_remote: RemoteSpec, s3_client: Any) -> None:
    class FailsMidway(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            if self.sent >= 12 * MiB:
                raise RuntimeError("source failed")
            n = min(len(b), MiB)
            b[:n] = b"\xab" * n
            self.sent += n
            return n

    async def t(b: S3Backend) -> None:
        with pytest.raises(RuntimeError, match="source failed"):
            await b.write("partial", FailsMidway())  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            await b.stat("partial")

    run(make_s3_backend(s3_remote, **SMALL_PARTS), t)
    assert s3_client.list_multipart_uploads(Bucket=s3_remote.config["bucket"]).get("Uploads", []) == []


def test_cancelled_upload_is_aborted(s3_remote: RemoteSpec, s3_client: Any) -> None:
    class Slow(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            time.sleep(0.02)
            n = min(len(b), MiB)
            b[:n] = b"\x01" * n
            return n

    async def t(b: S3Backend) -> None:
        with trio.move_on_after(1.5) as scope:
            await b.write("endless", Slow())  # type: ignore[arg-type]
        assert scope.cancelled_caught
        with pytest.raises(NotFound):
            await b.stat("endless")

    run(make_s3_backend(s3_remote, **SMALL_PARTS), t)
    assert s3_client.list_multipart_uploads(Bucket=s3_remote.config["bucket"]).get("Uploads", []) == []


def test_metadata_layout_and_copy_in_place(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]
    mtime = 1_600_000_000_123_456_789

    async def t(b: S3Backend) -> None:
        await put(b, "notes.txt", b"text", SetAttrs(mode=0o640, uid=1000, gid=100, mtime_ns=mtime))
        head = s3_client.head_object(Bucket=bucket, Key="notes.txt")
        assert head["ContentType"].startswith("text/plain")
        assert head["Metadata"]["omnifs-mode"] == "640"
        assert head["Metadata"]["omnifs-mtime"] == str(mtime)
        assert (head["Metadata"]["omnifs-uid"], head["Metadata"]["omnifs-gid"]) == ("1000", "100")
        # A plain user key added by another tool is kept and exposed.
        s3_client.copy_object(
            Bucket=bucket,
            Key="notes.txt",
            CopySource={"Bucket": bucket, "Key": "notes.txt"},
            MetadataDirective="REPLACE",
            Metadata={**head["Metadata"], "color": "blue"},
            ContentType=head["ContentType"],
        )
        st = await b.stat("notes.txt")
        assert st.metadata == {"color": "blue"} and st.mtime_ns == mtime and st.mode == 0o640
        await b.set_attrs("notes.txt", SetAttrs(mode=0o600, mtime_ns=mtime + 1))
        await b.set_xattr("notes.txt", "user.Mixed_Case", b"\x00\xff")
        # An overwrite keeps attributes, xattrs and user metadata it does not name.
        await put(b, "notes.txt", b"new text")
        st = await b.stat("notes.txt")
        assert st.mode == 0o600 and st.uid == 1000 and st.metadata == {"color": "blue"}
        assert await b.get_xattrs("notes.txt") == {"user.Mixed_Case": b"\x00\xff"}

    run(make_s3_backend(s3_remote), t)
    head = s3_client.head_object(Bucket=bucket, Key="notes.txt")
    assert head["ContentType"].startswith("text/plain")
    assert head["Metadata"]["color"] == "blue" and head["Metadata"]["omnifs-mode"] == "600"
    assert s3_client.get_object(Bucket=bucket, Key="notes.txt")["Body"].read() == b"new text"


def test_set_attrs_on_large_object_uses_multipart_copy(s3_remote: RemoteSpec, s3_client: Any) -> None:
    data = blob(11 * MiB, seed=5)

    async def t(b: S3Backend) -> None:
        await put(b, "big", data)
        await b.set_attrs("big", SetAttrs(mode=0o604))
        assert (await b.stat("big")).mode == 0o604
        await b.rename("big", "moved")
        assert (await b.stat("moved")).mode == 0o604
        assert await b.read("moved", 6 * MiB, 10) == data[6 * MiB : 6 * MiB + 10]

    run(make_s3_backend(s3_remote, copy_threshold=5 * MiB, **SMALL_PARTS), t)
    head = s3_client.head_object(Bucket=s3_remote.config["bucket"], Key="moved")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-3"')


def test_xattr_metadata_limit(s3_remote: RemoteSpec) -> None:
    async def t(b: S3Backend) -> None:
        await put(b, "f", b"x")
        await b.set_xattr("f", "user.small", b"ok")
        with pytest.raises(OmniError) as excinfo:
            await b.set_xattr("f", "user.huge", b"x" * 2000)
        assert excinfo.value.errno == errno.E2BIG
        assert await b.get_xattrs("f") == {"user.small": b"ok"}
        await b.mkdir("d")
        await b.set_xattr("d", "user.on-dir", b"1")
        assert await b.get_xattrs("d") == {"user.on-dir": b"1"}

    run(make_s3_backend(s3_remote), t)


def test_symlinks_survive_rename_and_attrs(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]

    async def t(b: S3Backend) -> None:
        await b.mkdir("d")
        await b.symlink("d/ln", "../target with space")
        await put(b, "d/small", b"not a link")
        await b.rename("d/ln", "d/ln2")
        await b.set_attrs("d/ln2", SetAttrs(uid=42))
        await b.rename("d", "e")
        listed = {i.name: i for i in await b.list("e")}
        assert (listed["ln2"].kind, listed["ln2"].target) == ("symlink", "../target with space")
        assert listed["small"].kind == "file"
        st = await b.stat("e/ln2")
        assert st.kind == "symlink" and st.uid == 42
        assert await b.read("e/small", 0, 100) == b"not a link"

    run(make_s3_backend(s3_remote), t)
    head = s3_client.head_object(Bucket=bucket, Key="e/ln2")
    assert head["Metadata"]["omnifs-symlink"] == "1" and head["ETag"].endswith('-1"')


def test_list_leaves_mode_unknown_for_unseen_objects(s3_remote: RemoteSpec, s3_client: Any) -> None:
    s3_client.put_object(Bucket=s3_remote.config["bucket"], Key="f", Body=b"abc", Metadata={"omnifs-mode": "600"})

    async def t(b: S3Backend) -> None:
        [listed] = await b.list("")
        assert listed.kind == "file" and listed.size == 3 and listed.mode is None and listed.mtime_ns > 0
        assert (await b.stat("f")).mode == 0o600
        [listed] = await b.list("")  # the HEAD above taught list the attributes of this version
        assert listed.mode == 0o600

    run(make_s3_backend(s3_remote), t)


# --- rename ---------------------------------------------------------------------------------------------


def test_rename_directory_with_many_keys(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]
    names = [f"sub{i % 3}/f{i:02d}" for i in range(50)]

    async def t(b: S3Backend) -> None:
        await b.mkdir("src", SetAttrs(mode=0o750))
        for d in ("sub0", "sub1", "sub2"):
            await b.mkdir(f"src/{d}")
        async with trio.open_nursery() as n:
            for name in names:
                n.start_soon(put, b, f"src/{name}", name.encode())
        await b.mkdir("other")
        await put(b, "other/x", b"x")
        with pytest.raises(NotEmpty):
            await b.rename("src", "other")
        await b.rename("src", "dst")
        with pytest.raises(NotFound):
            await b.stat("src")
        assert (await b.stat("dst")).mode == 0o750
        for name in names[:5]:
            assert await b.read(f"dst/{name}", 0, 100) == name.encode()

    run(make_s3_backend(s3_remote), t)
    assert keys(s3_client, bucket, "src") == []
    expected = sorted(["dst/", "dst/sub0/", "dst/sub1/", "dst/sub2/"] + [f"dst/{n}" for n in names])
    assert keys(s3_client, bucket, "dst") == expected


def test_interrupted_directory_rename_resumes(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]

    class FlakyDeletes(S3Backend):
        """Fails the first batch delete, as a crash after the copies would."""

        failed = False

        def _delete_keys(self, keys: Any) -> None:
            if not FlakyDeletes.failed:
                FlakyDeletes.failed = True
                raise TransientError("injected failure")
            super()._delete_keys(keys)

    spec = {k: v for k, v in s3_remote.config.items() if k != "type"}
    flaky = FlakyDeletes(
        "flaky",
        access_key_id=s3_remote.env["AWS_ACCESS_KEY_ID"],
        secret_access_key=s3_remote.env["AWS_SECRET_ACCESS_KEY"],
        **spec,
    )

    async def t(b: S3Backend) -> None:
        await b.mkdir("src")
        for i in range(5):
            await put(b, f"src/f{i}", str(i).encode())
        with pytest.raises(TransientError):
            await b.rename("src", "dst")
        # Nothing is lost and both copies exist; the destination is not empty ...
        assert len(await b.list("src")) == 5 and len(await b.list("dst")) == 5
        # ... yet repeating the rename completes it.
        await b.rename("src", "dst")
        with pytest.raises(NotFound):
            await b.stat("src")
        assert [await b.read(f"dst/f{i}", 0, 10) for i in range(5)] == [str(i).encode() for i in range(5)]

    run(flaky, t)
    assert keys(s3_client, bucket) == ["dst/"] + [f"dst/f{i}" for i in range(5)]
    assert "omnifs-rename-from" not in s3_client.head_object(Bucket=bucket, Key="dst/")["Metadata"]


# --- listing at scale ------------------------------------------------------------------------------------


def test_list_paginates_thousands_of_keys(s3_remote: RemoteSpec, s3_client: Any) -> None:
    bucket = s3_remote.config["bucket"]
    count = 2500  # three ListObjectsV2 pages
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3_client.put_object(Bucket=bucket, Key=f"big/k{i:05d}", Body=b""), range(count)))

    async def t(b: S3Backend) -> None:
        listed = await b.list("big")
        assert [i.name for i in listed] == [f"k{i:05d}" for i in range(count)]

    run(make_s3_backend(s3_remote), t)


# --- failures ----------------------------------------------------------------------------------------------


def test_unknown_bucket_is_named(s3_remote: RemoteSpec) -> None:
    async def t(b: S3Backend) -> None:
        for call in (b.stat(""), b.list(""), b.stat("some/file")):
            with pytest.raises(BackendUnavailable, match="omnifs-no-such-bucket") as excinfo:
                await call
            assert not b.is_temp_failure(excinfo.value)

    run(make_s3_backend(s3_remote, bucket="omnifs-no-such-bucket"), t)


def test_unreachable_endpoint_fails_fast(s3_remote: RemoteSpec) -> None:
    closed = f"http://127.0.0.1:{free_port()}"

    async def t(b: S3Backend) -> None:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match="cannot reach") as excinfo:
            await b.stat("f")
        assert time.monotonic() - start < 5
        assert b.is_temp_failure(excinfo.value)

    run(make_s3_backend(s3_remote, endpoint_url=closed), t)


def test_frozen_server_times_out(s3_server: MotoServer, s3_remote: RemoteSpec) -> None:
    async def t(b: S3Backend) -> None:
        await put(b, "f", b"data")
        s3_server.freeze()
        try:
            start = time.monotonic()
            with pytest.raises((TransientError, BackendUnavailable)) as excinfo:
                await b.read("f", 0, 4)
            assert time.monotonic() - start < 5
            assert b.is_temp_failure(excinfo.value)
        finally:
            s3_server.thaw()
        assert await b.read("f", 0, 4) == b"data"

    run(make_s3_backend(s3_remote, connect_timeout=1, read_timeout=1, max_attempts=1), t)


def test_restarted_server_loses_bucket(s3_server: MotoServer, s3_remote: RemoteSpec) -> None:
    async def t(b: S3Backend) -> None:
        await put(b, "f", b"x")
        s3_server.stop()
        with pytest.raises(BackendUnavailable, match="cannot reach"):
            await b.stat("f")
        s3_server.start()  # moto keeps nothing: the bucket is gone now
        with pytest.raises(BackendUnavailable, match=s3_remote.config["bucket"]):
            await b.stat("f")

    run(make_s3_backend(s3_remote, max_attempts=1), t)
