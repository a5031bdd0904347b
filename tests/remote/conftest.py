"""A real S3 HTTP API for the remote tests: moto's server on 127.0.0.1 (a free port), s3fs as the client.

`s3_server` (session) starts it once; `s3_bucket` (per test) creates a fresh bucket, points fsspec at the
server (FSSPEC_S3_ENDPOINT_URL, dummy credentials) and yields its URL. Nothing here reaches any address
but 127.0.0.1: the endpoint is set before any s3fs filesystem is made, and s3fs's instance cache is
cleared so no earlier configuration leaks in."""
from __future__ import annotations

import uuid

import pytest
from tests.common.helpers import free_port

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")



@pytest.fixture(scope="session")
def s3_server():
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # one line per request otherwise
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """fsspec's s3 filesystems, in this process and in the processes it starts, talk to the local server."""
    for key, value in {"FSSPEC_S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # fsspec reads FSSPEC_S3_* once, at import: this process needs its config set directly
    import fsspec.config
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_server})
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_env):
    """A new, empty bucket: 's3://NAME'."""
    import fsspec
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def faulty_s3(s3_bucket, s3_server, monkeypatch):
    """`s3_bucket` reached through tests/remote/faulty_proxy.py: yields (bucket URL, proxy). s3fs's and
    botocore's own retries are turned off, so what is retried is our retry loop (with short waits)."""
    import fsspec.config

    from g2sd_cache.cache import remote
    from tests.remote.faulty_proxy import FaultyProxy
    with FaultyProxy(s3_server) as proxy:
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": proxy.url,
                                                       "config_kwargs": {"retries": {"max_attempts": 1}}})
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
        monkeypatch.setattr(remote, "DEFAULT_RETRY", remote.RetryPolicy(attempts=4, base_s=0.01, max_s=0.05))
        s3fs.S3FileSystem.clear_instance_cache()
        yield s3_bucket, proxy
        s3fs.S3FileSystem.clear_instance_cache()
