"""Seconds and requests of `status` and `store info` on the demo's store in three places, side by
side: a local folder, a working store on S3 (the local store copied there as it is) and a
published store on S3 (`store publish`: trimmed, sharded, consolidated metadata). S3 is a local
S3-compatible server (moto on 127.0.0.1); requests are counted on the server, per method. Target:
the published store needs at most a third of the working store's requests.

    python bench/sharing.py                  # extracts the demo first (about a minute)
    python bench/sharing.py --store PATH     # an existing local store of the demo manifest
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.cli import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402


class RequestCounter(logging.Handler):
    """Counts the server's request log lines ("GET /bucket/key HTTP/1.1" 200) by method."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            if f'"{method} ' in text or f'm{method} ' in text:
                self.counts[method] += 1
                return


def start_server() -> tuple[Any, str, RequestCounter]:
    from moto.server import ThreadedMotoServer

    counter = RequestCounter()
    log = logging.getLogger("werkzeug")
    log.setLevel(logging.INFO)
    log.addHandler(counter)
    log.propagate = False  # counted, not printed
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    return server, endpoint, counter


def invoke(args: list[str]) -> float:
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - start
    if result.exit_code not in (0, 1):  # status --check is not used: 1 would be a failure too
        sys.exit(f"{' '.join(args)}: exit {result.exit_code}\n{result.output}")
    if result.exit_code:
        sys.exit(f"{' '.join(args)}: {result.stderr.strip()}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="a local store of data_manifest.yaml (default: extract "
                                             "the demo into a temporary folder)")
    p.add_argument("--repeat", type=int, default=3, help="runs per command (the fastest is shown)")
    args = p.parse_args()
    import s3fs
    from shipyard.pipeline.publish import publish

    manifest = str(ROOT / "data_manifest.yaml")
    work = Path(tempfile.mkdtemp(prefix="shipyard-sharing-"))
    local = str(args.store.resolve()) if args.store else str(work / "demo.zarr")
    if not args.store:
        print("extracting the demo ...", file=sys.stderr, flush=True)
        if CliRunner().invoke(app, ["--manifest", manifest, "--store", local, "--device", "cpu",
                                    "extract"]).exit_code:
            sys.exit("extract failed")
    server, endpoint, counter = start_server()
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        fs.put(local, "bench/working.zarr", recursive=True)
        publish(local, "s3://bench/published.zarr")
        places = {"local": local, "s3 working": "s3://bench/working.zarr",
                  "s3 published": "s3://bench/published.zarr"}
        commands = {"status": ["status", "--json"], "store info": ["store", "info", "--json"]}
        rows = []
        for cmd, tail in commands.items():
            for place, location in places.items():
                best, requests = float("inf"), Counter[str]()
                for _ in range(args.repeat):
                    s3fs.S3FileSystem.clear_instance_cache()  # no listing cached between runs
                    counter.counts.clear()
                    best = min(best, invoke(["--manifest", manifest, "--store", location,
                                             "--device", "cpu", *tail]))
                    requests = Counter(counter.counts)
                rows.append((cmd, place, best, requests))
    finally:
        server.stop()
    print(f"{'command':<12}{'store':<15}{'seconds':>9}{'requests':>10}  by method")
    for cmd, place, seconds, requests in rows:
        methods = ", ".join(f"{m} {n}" for m, n in sorted(requests.items()))
        print(f"{cmd:<12}{place:<15}{seconds:>9.2f}{sum(requests.values()):>10}  {methods}")
    for cmd in commands:
        by = {place: sum(r.values()) for c, place, _, r in rows if c == cmd}
        if by["s3 working"]:
            print(f"{cmd}: published / working requests = "
                  f"{by['s3 published'] / by['s3 working']:.2f} (target <= 0.33)")


if __name__ == "__main__":
    main()
