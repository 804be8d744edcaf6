"""moto's S3 server for the tests, benchmarks and chaos trials of stores on S3 (the ``dev`` extra's ``moto[server]``).

One way to start it: a subprocess serving on a port of 127.0.0.1 that it bound itself, with a bucket made, test
credentials.
"""

from __future__ import annotations

import select
import subprocess
import sys
import tempfile
from typing import IO, Any

#: The credentials and region the server accepts (any; these are moto's test values).
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}

#: The server process: moto on a port of 127.0.0.1 the system picks, bound before the port is told on stdout (no
#: other process can hold it, unlike a port found free first and bound later); then it serves until killed. Its
#: request log is left out (stderr keeps warnings and errors only).
_SERVE = """
import logging, os, threading
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
threading.Event().wait()
"""


def start_moto_s3(bucket: str, *, timeout: float = 60.0) -> tuple[subprocess.Popen, str, Any]:
    """moto's S3 server on 127.0.0.1 with ``bucket`` made: (the process, its endpoint URL, a boto3 client of it).
    The endpoint is always the returned process's own. RuntimeError, with the server's last words, when it does not
    start within ``timeout`` seconds or exits (the process is killed)."""
    import boto3

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        port = _read_port(proc, timeout)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS)
        try:
            client.create_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"making the bucket {bucket} failed: {exc}") from exc
        if proc.poll() is not None:
            raise RuntimeError(f"it exited (status {proc.returncode})")
    except Exception as exc:  # noqa: BLE001 - any failure to start it, told with what the server said
        proc.kill()
        proc.wait()
        log.seek(0)
        said = log.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"moto's S3 server did not start: {exc}" + (f". It said:\n{said}" if said else "")) from None
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()
    return proc, endpoint, client


def _read_port(proc: subprocess.Popen, timeout: float) -> int:
    """The port the server process tells on its first line (RuntimeError when none comes within ``timeout``)."""
    out: IO[str] | None = proc.stdout
    assert out is not None
    ready, _, _ = select.select([out], [], [], timeout)
    line = out.readline() if ready else ""
    if not line.strip().isdigit():
        raise RuntimeError(f"it told no port within {timeout:.0f} s" if not ready else
                           "it exited before serving (is moto's server installed? pip install 'moto[server]')")
    return int(line)
