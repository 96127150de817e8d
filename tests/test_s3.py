"""The shard store against a real S3 API: moto's server mode on loopback, started here, stopped after.

The backend-dependent tests of tests/test_storage.py run again here on ``s3://`` URLs (their
``url`` fixture is replaced by this module's), followed by what only an object store can get
wrong: options that must reach DataLoader workers, listings cached while another process
commits, temp keys left by atomic writes, and ``labelfoundry verify s3://...`` on a damaged shard.

s3fs finds the server the way a user's job would: AWS_ENDPOINT_URL and fake keys in the
environment (or, in one test, explicit ``storage_options`` only).
"""

from __future__ import annotations

import os
import socket
import uuid

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install 'labelfoundry[dev]'")
pytest.importorskip("moto.server", reason="S3 tests need moto's server: pip install 'moto[server]'")

import storage  # noqa: E402
from storage import ShardStore, open_dataset, verify  # noqa: E402
from tests.test_storage import (  # noqa: E402, F401  (re-collected here, on S3)
    _create,
    make_samples,
    test_clear_errors,
    test_concurrent_writers_and_pickling,
    test_filter_flags_select_without_touching_data,
    test_missing_chunk_raises_instead_of_zeros,
    test_round_trip,
    test_uncommitted_shard_is_invisible_and_rewrite_is_idempotent,
    write_all,
)

BUCKET = "lf-test"
SMALL = 12  # samples in the S3-only tests: 3 shards of 4 (every request to the server costs ~30 ms)
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop_cached_filesystems() -> None:
    """fsspec caches one S3FileSystem per set of options: a test that changes the environment
    must not get one built for another endpoint."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free loopback port with one bucket; the environment points s3fs and
    boto3 at it (fake keys, no instance-metadata lookups) until the module ends."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**FAKE_KEYS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _drop_cached_filesystems()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _drop_cached_filesystems()
        server.stop()


@pytest.fixture
def url(s3_endpoint):
    """A fresh dataset prefix in the bucket (replaces tests/test_storage.py's local/memory URLs)."""
    return f"s3://{BUCKET}/ds-{uuid.uuid4().hex[:12]}"


def _keys(endpoint: str, url: str) -> list[str]:
    """Every object key under ``url``, listed by boto3 (no s3fs cache involved)."""
    import boto3

    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/"
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for page in pages for o in page.get("Contents", []))


# ------------------------------------------------------------------------------------------ tests
def test_writer_leaves_only_the_layout_on_s3(s3_endpoint, url):
    """create + write_shard on S3 publish the documented layout and no temp keys of atomic writes."""
    store = _create(url, num_samples=SMALL)
    write_all(store)
    keys = _keys(s3_endpoint, url)
    assert "dataset.json" in keys and "data.zarr/zarr.json" in keys
    assert [k for k in keys if k.startswith("manifest/")] == [f"manifest/shard-{i:06d}.parquet" for i in range(3)]
    assert [k for k in keys if "/." in "/" + k] == []  # no .name.tmp-* left by atomic writes
    assert verify(url).checked == [0, 1, 2]


def test_commits_by_another_process_are_seen_despite_listing_caches(url):
    """A reader's s3fs caches the listings it made; shards committed meanwhile by another process
    (here: another S3FileSystem instance, which shares no cache) must still count."""
    reader = _create(url, num_samples=SMALL)
    reader.write_shard(0, *make_samples(reader, 0))
    assert reader.committed_shards() == [0] and len(open_dataset(url)) == 4  # listings now cached

    other = ShardStore.open(url, mode="a", storage_options={"skip_instance_cache": True})
    for i in (1, 2):
        other.write_shard(i, *make_samples(other, i))

    assert reader.committed_shards() == [0, 1, 2] and reader.is_complete()
    assert len(open_dataset(url)) == SMALL
    assert verify(url).ok


def test_readers_with_explicit_storage_options_in_dataloader_workers(s3_endpoint, url, monkeypatch):
    """No AWS_* in the environment: the endpoint and keys reach the map-style and the iterable
    readers, and spawned DataLoader workers, only through storage_options."""
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    written = write_all(_create(url, num_samples=SMALL))
    for k in ("AWS_ENDPOINT_URL", *FAKE_KEYS):
        monkeypatch.delenv(k)
    _drop_cached_filesystems()
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}
    opened = open_dataset(url, filter="shard != 1", storage_options=options)
    expected = {i * 4 + j: samples["image"][j] for i, (samples, _) in written.items() for j in range(len(samples["image"]))}
    ids = [i for i in range(SMALL) if i // 4 != 1]
    assert opened.sample_ids.tolist() == ids

    ds = opened.dataset()
    np.testing.assert_array_equal(ds[2]["image"].permute(1, 2, 0).numpy(), expected[ids[2]])
    batch = next(iter(DataLoader(ds, batch_size=3, sampler=[0, 5, 7])))  # one read per batch
    assert batch["sample_id"].tolist() == [ids[0], ids[5], ids[7]]
    np.testing.assert_array_equal(batch["image"][1].permute(1, 2, 0).numpy(), expected[ids[5]])

    train = opened.iterable(shuffle=True, seed=1)
    # a spawned worker starts without the parent's filesystems: the options travel in the pickle
    loader = DataLoader(train, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    seen = {}
    for item in loader:
        seen[int(item["sample_id"])] = item["image"].permute(1, 2, 0).numpy()
    assert sorted(seen) == ids
    for sid, image in seen.items():
        np.testing.assert_array_equal(image, expected[sid])
    assert storage.verify(url, storage_options=options).ok


def test_read_backends_on_s3(url):
    """zarr (and auto, which picks it) read s3; the local-only fast backends refuse it clearly."""
    write_all(_create(url, num_samples=SMALL))
    opened = open_dataset(url)
    by_zarr = [opened.dataset(backend="zarr")[i]["label"].numpy() for i in (0, SMALL - 1)]
    by_auto = [opened.dataset(backend="auto")[i]["label"].numpy() for i in (0, SMALL - 1)]
    for a, b in zip(by_zarr, by_auto, strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("tensorstore", "zarrs"):
        if storage.read_backends.installed(name):
            with pytest.raises(ValueError, match="backend='zarr'"):
                opened.dataset(backend=name)[0]


def test_cli_verify_on_s3(s3_endpoint, url):
    """`labelfoundry verify s3://...` finds the server through the environment alone; a damaged
    shard object fails it and is named."""
    import boto3
    from typer.testing import CliRunner

    from flows.cli import app

    store = _create(url, num_samples=SMALL)
    write_all(store)
    ok = CliRunner().invoke(app, ["verify", url])
    assert ok.exit_code == 0, ok.output
    assert "3 committed shard(s) checked, 0 bad" in ok.output

    key = url.removeprefix(f"s3://{BUCKET}/") + "/" + store.layout.shard_file_key("label", 2)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=data[: len(data) // 2])
    bad = CliRunner().invoke(app, ["verify", url])
    assert bad.exit_code == 1, bad.output
    assert "label/c/2/" in bad.output and "shard-000002.parquet" in bad.output
