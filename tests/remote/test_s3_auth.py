"""The s3 plugin's signatures and credentials against a moto that checks them (an IAM user
of its own; every request after set-up must carry a valid AWS Signature V4), and S3's
retryable and final error answers from the server of faults."""

from __future__ import annotations

import datetime
import http.server
import json
import random
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.remote.servers import LOCALHOST, Moto, fault_server, moto_server
from tests.support import (
    listing,
    nbdsh,
    read_export,
    run,
    trionbd_exit,
    trionbd_process,
)

pytestmark = pytest.mark.usefixtures("aws_env")

POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


@dataclass
class Checked:
    """A moto that checks signatures, with a bucket ``data`` holding ``objects``."""

    moto: Moto
    key_id: str
    secret: str
    objects: dict[str, bytes]

    def args(self, *more: str) -> tuple[str, ...]:
        return ("s3", "bucket=data", f"endpoint-url={self.moto.endpoint}", *more)


@pytest.fixture(scope="module")
def checked() -> Iterator[Checked]:
    with moto_server() as moto:
        own = {"region_name": "us-east-1", "endpoint_url": moto.endpoint}
        iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="x", **own)
        iam.create_user(UserName="trionbd")
        iam.put_user_policy(UserName="trionbd", PolicyName="all", PolicyDocument=json.dumps(POLICY))
        key = iam.create_access_key(UserName="trionbd")["AccessKey"]
        trust = {**POLICY, "Statement": [{**POLICY["Statement"][0], "Principal": {"AWS": "*"}}]}
        iam.create_role(RoleName="disks", AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(RoleName="disks", PolicyName="all", PolicyDocument=json.dumps(POLICY))
        # From now on moto checks every request's signature against this user's key.
        request = urllib.request.Request(
            f"{moto.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=30).read()
        creds = {
            "aws_access_key_id": key["AccessKeyId"],
            "aws_secret_access_key": key["SecretAccessKey"],
        }
        s3 = boto3.client("s3", **creds, **own)
        s3.create_bucket(Bucket="data")
        rng = random.Random(11)
        objects = {
            k: rng.randbytes(rng.randrange(1000, 300_000))
            for k in ("odd dir+/a b.img", "odd dir+/ü~.img", "plain.img")
        }
        for k, body in objects.items():
            s3.put_object(Bucket="data", Key=k, Body=body)
        yield Checked(moto, key["AccessKeyId"], key["SecretAccessKey"], objects)


def test_signed_reads_listing_and_writes(checked: Checked, tmp_path: Path) -> None:
    keys = (f"access-key={checked.key_id}", f"secret-key={checked.secret}")
    with trionbd_process(*checked.args("prefix=odd dir+/", *keys)) as server:
        assert [e["export-name"] for e in listing(server.uri)] == ["a b.img", "ü~.img"]
        for name in ("a b.img", "ü~.img"):
            assert (
                read_export(server.uri_for(name), tmp_path) == checked.objects[f"odd dir+/{name}"]
            )
    with trionbd_process(*checked.args("key=disk", "size=1M", "object-size=64K", *keys)) as server:
        nbdsh(server.uri, "h.pwrite(b'x' * 70000, 1000); h.trim(4 * 65536, 2 * 65536)")
        assert run(["nbdinfo", "--map", server.uri]).split() == [
            "0", "131072", "0", "data", "131072", "917504", "3", "hole,zero",
        ]  # fmt: skip
        nbdsh(server.uri, "h.trim(65536 * 16, 0)")  # DeleteObjects, signed with Content-MD5
        assert "data" not in run(["nbdinfo", "--map", server.uri])


def test_a_wrong_secret_is_refused(checked: Checked) -> None:
    result = trionbd_exit(
        *checked.args("prefix=odd", f"access-key={checked.key_id}", "secret-key=nope")
    )
    assert result.returncode == 1
    assert "SignatureDoesNotMatch" in result.stderr


def test_credentials_from_the_environment(
    checked: Checked, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", checked.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", checked.secret)
    with trionbd_process(*checked.args("key=plain.img")) as server:
        assert read_export(server.uri, tmp_path) == checked.objects["plain.img"]


def test_credentials_from_a_profile(
    checked: Checked, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = tmp_path / "aws"
    files.mkdir()
    (files / "credentials").write_text(
        f"[backup]\naws_access_key_id = {checked.key_id}\n"
        f"aws_secret_access_key = {checked.secret}\n"
    )
    (files / "config").write_text("[profile backup]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(files / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(files / "config"))
    # The environment holds moto's default "testing" key, which this moto refuses: only
    # the profile's key works (an explicit profile= outranks the environment).
    with trionbd_process(*checked.args("key=plain.img", "profile=backup")) as server:
        assert read_export(server.uri, tmp_path) == checked.objects["plain.img"]
    refused = trionbd_exit(*checked.args("key=plain.img"))
    assert refused.returncode == 1


def test_temporary_credentials_on_the_command_line(checked: Checked, tmp_path: Path) -> None:
    sts = boto3.client(
        "sts", endpoint_url=checked.moto.endpoint, region_name="us-east-1",
        aws_access_key_id=checked.key_id, aws_secret_access_key=checked.secret,
    )  # fmt: skip
    role = "arn:aws:iam::123456789012:role/disks"
    creds = sts.assume_role(RoleArn=role, RoleSessionName="cli")["Credentials"]
    keys = (f"access-key={creds['AccessKeyId']}", f"secret-key={creds['SecretAccessKey']}")
    token = f"session-token={creds['SessionToken']}"
    with trionbd_process(*checked.args("key=plain.img", *keys, token)) as server:
        assert read_export(server.uri, tmp_path) == checked.objects["plain.img"]
    assert trionbd_exit(*checked.args("key=plain.img", *keys)).returncode == 1  # no token


class _Credentials(http.server.BaseHTTPRequestHandler):
    """A container credentials endpoint (what ECS serves): temporary credentials that
    expire in five minutes, so botocore must refresh them before each use."""

    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.calls += 1
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        body = json.dumps(
            {**self.server.creds, "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


def test_refreshing_credentials_from_a_container_endpoint(
    checked: Checked, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sts = boto3.client(
        "sts", endpoint_url=checked.moto.endpoint, region_name="us-east-1",
        aws_access_key_id=checked.key_id, aws_secret_access_key=checked.secret,
    )  # fmt: skip
    role = "arn:aws:iam::123456789012:role/disks"
    temporary = sts.assume_role(RoleArn=role, RoleSessionName="trionbd")["Credentials"]
    server = http.server.ThreadingHTTPServer((LOCALHOST, 0), _Credentials)
    server.calls = 0  # type: ignore[attr-defined]
    server.creds = {  # type: ignore[attr-defined]
        "AccessKeyId": temporary["AccessKeyId"],
        "SecretAccessKey": temporary["SecretAccessKey"],
        "Token": temporary["SessionToken"],
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        port = server.server_address[1]
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://{LOCALHOST}:{port}/creds")
        with trionbd_process(*checked.args("key=plain.img")) as nbd:
            assert read_export(nbd.uri, tmp_path) == checked.objects["plain.img"]
        assert server.calls >= 2  # type: ignore[attr-defined]  # fetched, then refreshed
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --- S3's error answers --------------------------------------------------------------------


def test_slowdown_and_request_timeout_are_retried_other_errors_are_not() -> None:
    data = random.Random(12).randbytes(100_000)
    with fault_server(data) as server:
        endpoint = f"http://{LOCALHOST}:{server.server_address[1]}"
        args = ("s3", "bucket=b", "key=disk.img", f"endpoint-url={endpoint}", "retry-delay=0.01")
        with trionbd_process(*args) as nbd:
            script = "print(h.pread(1000, 5000) == open(%r, 'rb').read()[5000:6000])"
            expected = Path(nbd.socket).parent / "expected"
            expected.write_bytes(data)
            before = server.gets()
            server.faults.plan = [
                (503, "SlowDown"),
                (400, "RequestTimeout"),
                (500, "InternalError"),
            ]
            assert nbdsh(nbd.uri, script % str(expected)).strip() == "True"
            assert server.gets() - before == 4
            server.faults.plan = [(400, "InvalidArgument")]
            out = nbdsh(
                nbd.uri,
                f"""
try:
    h.pread(1000, 5000)
except nbd.Error as e:
    print(e.errno)
print(h.pread(10, 0) == {data[:10]!r})
""",
            )
            assert out.split() == ["EIO", "True"]
            assert server.gets() - before == 4 + 2  # not retried
            assert "HTTP 400 Bad Request (InvalidArgument: as planned)" in nbd.stderr
