"""What identify clients that send part of a photo and then stall hold on the server: memory (RSS) and temporary
files, with SPECIESID_MAX_RECEIVING bodies received at once. The app runs in this process with a stand-in service
(no model: every body here stays unfinished); each client sends HEAD MiB of one photo part in 64 KiB messages (as
uvicorn hands a body on) and then waits; the figures are read 2 s later, and again once the clients have left.

    .venv/bin/python benchmarks/bench_receiving.py 30 0.9 30    # N clients, HEAD MiB each, SPECIESID_MAX_RECEIVING
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CpuWatch  # noqa: E402
from _hardware import machine_report  # noqa: E402

from api.app import create_app  # noqa: E402
from api.settings import Settings  # noqa: E402

PART = (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n")


def rss_mb() -> float:
    """This process's resident memory, MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


def temp_files() -> int:
    """This process's open temporary files (unlinked)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "(deleted)" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


async def measure(clients: int, head: int, cap: int) -> None:
    """Run ``clients`` stalled clients of ``head`` bytes each against the app, SPECIESID_MAX_RECEIVING ``cap``."""
    app = create_app(Settings(index="nowhere", max_identify_in_flight=1, max_receiving=cap, body_timeout_s=120),
                     service=SimpleNamespace())
    body = PART + b"x" * head  # one copy, shared by the clients: what the server holds is what is measured
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    hold, statuses = asyncio.Event(), []
    scope = {"type": "http", "method": "POST", "path": "/v1/identify", "raw_path": b"/v1/identify",
             "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http", "server": ("t", 80),
             "client": ("c", 1), "headers": [(b"content-type", b"multipart/form-data; boundary=xyz")]}

    async def one() -> None:
        at = 0

        async def receive() -> dict:
            nonlocal at
            if at < len(chunks):
                at += 1
                return {"type": "http.request", "body": chunks[at - 1], "more_body": True}
            await hold.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)

    before, files = rss_mb(), temp_files()
    tasks = [asyncio.create_task(one()) for _ in range(clients)]
    await asyncio.sleep(2)
    print(f"{clients} clients x {head / 2**20:.2f} MiB sent, SPECIESID_MAX_RECEIVING={cap}: RSS "
          f"+{rss_mb() - before:.0f} MB, temp files open {temp_files() - files}, answered 429 at once "
          f"{statuses.count(429)}")
    hold.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    gc.collect()
    print(f"after they left: temp files open {temp_files() - files}, statuses {sorted(set(statuses))}")


def main() -> None:
    """Parse the command line and measure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clients", type=int, help="stalled clients")
    parser.add_argument("head_mib", type=float, help="MiB of a photo part each sends before it stalls")
    parser.add_argument("max_receiving", type=int, help="SPECIESID_MAX_RECEIVING")
    args = parser.parse_args()
    print("bench_receiving: where it ran\n" + machine_report(), flush=True)
    watch = CpuWatch()
    asyncio.run(measure(args.clients, int(args.head_mib * 2**20), args.max_receiving))
    print(watch.report())


if __name__ == "__main__":
    main()
