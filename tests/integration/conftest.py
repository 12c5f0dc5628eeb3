"""Integration fixtures: a real S3-compatible server (moto, server mode) on loopback, a fault-injecting
proxy in front of it, and a local Ray. Only tests/integration sees them: the unit lane imports neither
moto, boto3 nor ray."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.integration.fault_proxy import FaultProxy

# s3fs with us-east-1 fails to create buckets on moto; any other region works.
S3_REGION = "us-west-2"
S3_KEY = "testing"
S3_SECRET = "testing"


@dataclass(frozen=True)
class S3Server:
    """How to reach the test S3 server."""

    endpoint_url: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for this server (a fresh dict each time)."""
        return {
            "key": S3_KEY,
            "secret": S3_SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": S3_REGION},
        }


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 and a free port, for the whole test session."""
    with pytest.MonkeyPatch.context() as env:
        # Dummy credentials for any client built from the environment; no real
        # profile or session token may leak in, and loopback never goes to a proxy.
        env.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("NO_PROXY", "127.0.0.1")
        env.setenv("no_proxy", "127.0.0.1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield S3Server(endpoint_url=f"http://{host}:{port}")
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A new, empty, uniquely named bucket on the test server, as ``"s3://<bucket>"``."""
    return _create_bucket(s3)


@pytest.fixture(scope="session")
def new_bucket(s3: S3Server) -> Callable[[], str]:
    """Creates new, empty, uniquely named buckets (for fixtures that live longer than one test)."""
    return lambda: _create_bucket(s3)


def _create_bucket(s3: S3Server) -> str:
    """Create a bucket on the test server; returns ``"s3://<bucket>"``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=S3_REGION,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    )
    client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": S3_REGION})
    return f"s3://{name}"


def copy_tree(source: str, target: str, options: dict[str, Any] | None = None) -> str:
    """Copy every file under source (a folder or prefix) to the same place under target, on one store, as new bytes (never
    a link: the copy may be changed in place); returns target. Tests copy a shared model or run before they change it."""
    from spade_batch.formats import listing, storage

    root = storage.normalize(source, options)
    for uri in listing.list_files(root, None, options):
        storage.write_bytes(storage.join(target, uri[len(root) + 1 :]), storage.read_bytes(uri, options), options)
    return target


@dataclass(frozen=True)
class StorageRoot:
    """A writable, empty root URI and the storage options that reach it."""

    base: str
    options: dict[str, Any] | None


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> StorageRoot:
    """Runs a test twice: on a local tmp folder and on a fresh bucket of the test S3 server."""
    if request.param == "local":
        return StorageRoot(str(tmp_path), None)
    s3 = request.getfixturevalue("s3")
    return StorageRoot(request.getfixturevalue("s3_bucket"), s3.storage_options)


TEST_RETRY = "attempts=3,first_delay_s=0.01,max_delay_s=0.02"
"""The storage retry policy (SPADE_BATCH_RETRY) of the session's Ray workers, and of the driver inside
faulty_s3: retries milliseconds apart, so fault tests wait on no real backoff."""


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray on 127.0.0.1 with 2 CPUs and no dashboard, for the whole session.

    The pipeline's init_ray() reuses it. Its temp dir is short (unix socket paths are limited to
    107 bytes) and private to this session, and is removed afterwards. Its workers, and processes
    the tests start, inherit SPADE_BATCH_RETRY=TEST_RETRY from the environment set here before
    ray.init (this process's retry.RETRY was read at import: faulty_s3 patches it).
    """
    import ray

    from spade_batch.formats.retry import RETRY_ENV

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RETRY_ENV, TEST_RETRY)
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
        try:
            assert ray.util.get_node_ip_address() == "127.0.0.1", (
                "the test Ray must stay on loopback: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported"
            )
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class FaultyS3:
    """The test S3 server behind a fault-injecting proxy, with fast retries and timeouts."""

    proxy: FaultProxy
    bucket: str
    options: dict[str, Any]
    direct_options: dict[str, Any]


@pytest.fixture
def faulty_s3(s3: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3]:
    """A fresh bucket reached through a :class:`FaultProxy`.

    botocore's own retries are off (one attempt per s3fs try), reads time out
    after 0.5 s, and retry.RETRY waits milliseconds (TEST_RETRY, which the
    session's Ray workers have too), so fault counts are exact and tests stay
    fast; s3fs's own retries inside one attempt remain.
    """
    from spade_batch.formats import retry

    monkeypatch.setattr(retry, "RETRY", retry.retry_policy_from(TEST_RETRY))
    proxy = FaultProxy(s3.endpoint_url)
    options = s3.storage_options
    options["client_kwargs"]["endpoint_url"] = proxy.endpoint_url
    options["config_kwargs"] = {"retries": {"total_max_attempts": 1}, "read_timeout": 0.5, "connect_timeout": 0.5}
    try:
        yield FaultyS3(proxy, s3_bucket, options, s3.storage_options)
    finally:
        proxy.close()
