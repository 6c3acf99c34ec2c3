"""The tests' S3 server: moto keeps its state per process, so a server must not inherit an earlier one's objects
(two suite-order failures came from a bucket left behind by an earlier test file)."""

from __future__ import annotations

import boto3
from helpers import moto_s3_server


def _client(endpoint: str):  # noqa: ANN202 - boto3 client type
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x")


def test_a_server_started_after_another_closed_starts_empty() -> None:
    with moto_s3_server() as first:
        _client(first).create_bucket(Bucket="left-behind")
        _client(first).put_object(Bucket="left-behind", Key="k", Body=b"v")
        assert [b["Name"] for b in _client(first).list_buckets()["Buckets"]] == ["left-behind"]
    with moto_s3_server() as second:
        assert _client(second).list_buckets()["Buckets"] == []


def test_servers_open_together_share_one_state() -> None:
    with moto_s3_server() as outer:
        _client(outer).create_bucket(Bucket="outer")
        with moto_s3_server() as inner:  # opening a second server must not wipe the one still in use
            assert [b["Name"] for b in _client(inner).list_buckets()["Buckets"]] == ["outer"]
        assert [b["Name"] for b in _client(outer).list_buckets()["Buckets"]] == ["outer"]
