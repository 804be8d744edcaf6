"""moto's S3 server for the tests, benchmarks and chaos trials of stores on S3 (the ``dev`` extra's ``moto[server]``).

One way to start it: a subprocess on a free port of 127.0.0.1, with a bucket made, test credentials.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

#: The credentials and region the server accepts (any; these are moto's test values).
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto_s3(bucket: str, *, timeout: float = 60.0) -> tuple[subprocess.Popen, str, Any]:
    """moto's S3 server on 127.0.0.1 with ``bucket`` made: (the process, its endpoint URL, a boto3 client of it).
    RuntimeError when it does not answer within ``timeout`` seconds (the process is killed)."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return proc, endpoint, client
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start (pip install 'moto[server]')") from None
            time.sleep(0.2)
