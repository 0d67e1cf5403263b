"""Latency of the managers' API with 100 rounds in the store: GET /rounds/{id} and GET /projects/{id}/progress.

Seeds a sample store (api.sample_data), serves it with uvicorn in its own process on 127.0.0.1, loads it with a
bounded loopback load generator (its own asyncio HTTP/1.1 keep-alive client: a fixed number of requests per
concurrency level, closed loop, with a time cap), and writes p50/p95/p99 per endpoint as JSON and markdown into
--out. Target: p95 < 50 ms.

    python benchmarks/api_latency.py --out benchmarks/results/api_latency
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from api.sample_data import create_sample_store  # noqa: E402
from modeling.latency import cpu_model_name  # noqa: E402

TOKEN = "benchmark-read-token"
TARGET_P95_MS = 50.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(project_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "LOOP_PROJECT_DIR": str(project_dir), "LOOP_API_READ_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    env.pop("LOOP_DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env=env, cwd=REPO_ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def wait_until_healthy(base_url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_ms:
        return float("nan")
    rank = max(1, min(len(sorted_ms), round(q / 100 * len(sorted_ms) + 0.5)))
    return sorted_ms[rank - 1]


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One keep-alive HTTP/1.1 GET on an open connection; returns the status (the body is read and dropped)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


async def load(port: int, paths: list[str], *, concurrency: int, time_cap_s: float) -> tuple[list[float], int, float]:
    """Send every path once over `concurrency` keep-alive connections; latency per request in ms, errors, wall time.

    A minimal HTTP/1.1 client on asyncio streams: on a 2-core machine a full HTTP client library would take
    CPU from the server it measures.
    """
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + time_cap_s

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                try:
                    path = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                           f"Connection: keep-alive\r\n\r\n").encode()
                sent = time.perf_counter()
                try:
                    status = await asyncio.wait_for(_get(reader, writer, request), timeout=30)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                elapsed_ms = (time.perf_counter() - sent) * 1000
                if status == 200:
                    latencies.append(elapsed_ms)
                else:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def summarize(latencies: list[float], errors: int, wall_s: float) -> dict:
    ordered = sorted(latencies)
    return {
        "requests_ok": len(ordered),
        "errors": errors,
        "p50_ms": round(percentile(ordered, 50), 2),
        "p95_ms": round(percentile(ordered, 95), 2),
        "p99_ms": round(percentile(ordered, 99), 2),
        "max_ms": round(ordered[-1], 2) if ordered else None,
        "mean_ms": round(statistics.fmean(ordered), 2) if ordered else None,
        "throughput_rps": round(len(ordered) / wall_s, 1) if wall_s > 0 else None,
        "p95_under_target": bool(ordered) and percentile(ordered, 95) < TARGET_P95_MS and errors == 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for api_latency.json and api_latency.md")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--images", type=int, default=2000, help="images in the sample project (0.3 of them are the unlabeled pool)")
    parser.add_argument("--requests", type=int, default=400, help="measured requests per endpoint and concurrency level")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests first, per endpoint and concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="connections in flight at once (closed loop); one run per value")
    parser.add_argument("--time-cap-s", type=float, default=120.0, help="stop each run after this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="api_latency_") as workdir:
        project_dir = Path(workdir) / "project"
        seeding_started = time.perf_counter()
        sample = create_sample_store(project_dir, n_rounds=args.rounds, n_images=args.images, name="latency-benchmark")
        seeding_s = time.perf_counter() - seeding_started
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        process = start_server(project_dir, port, Path(workdir) / "server.log")
        try:
            wait_until_healthy(base_url, process)
            rng = random.Random(args.seed)
            endpoints = {
                "GET /rounds/{id}": lambda: f"/rounds/{rng.choice(sample.round_ids)}",
                "GET /projects/{id}/progress": lambda: f"/projects/{sample.project_id}/progress",
            }
            # Sizes of what a client receives, for the record.
            sizes = {name: len(httpx.get(base_url + make(), headers={"Authorization": f"Bearer {TOKEN}"}).content) for name, make in endpoints.items()}
            results: dict[str, dict] = {}
            load_before = os.getloadavg()[0]
            for concurrency in args.concurrency:
                for name, make in endpoints.items():
                    asyncio.run(load(port, [make() for _ in range(args.warmup)], concurrency=concurrency, time_cap_s=args.time_cap_s))
                    latencies, errors, wall_s = asyncio.run(
                        load(port, [make() for _ in range(args.requests)], concurrency=concurrency, time_cap_s=args.time_cap_s)
                    )
                    key = f"{name} @ concurrency {concurrency}"
                    results[key] = {"endpoint": name, "concurrency": concurrency, **summarize(latencies, errors, wall_s), "response_bytes": sizes[name]}
                    print(f"{key}: {results[key]}")
            load_after = os.getloadavg()[0]
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)

    report = {
        "benchmark": "api_latency",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target_p95_ms": TARGET_P95_MS,
        "store": {"rounds": args.rounds, "images": args.images, "backend": "sqlite", "seeding_s": round(seeding_s, 1)},
        "load": {"requests_per_run": args.requests, "warmup_per_run": args.warmup, "concurrency": args.concurrency,
                 "client": "own asyncio HTTP/1.1 keep-alive client over loopback, closed loop", "server": "uvicorn, 1 process",
                 "time_cap_s": args.time_cap_s},
        # Other work on the machine shares its 2 cores: the 1-minute load average says how much.
        "machine": {"cpu": cpu_model_name(), "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1m_before": round(load_before, 2), "load_average_1m_after": round(load_after, 2)},
        "endpoints": results,
        "all_under_target": all(r["p95_under_target"] for r in results.values()),
    }
    (args.out / "api_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# API latency with {args.rounds} rounds in the store",  # (QA: titled 100 after --rounds 10)
        "",
        f"{args.rounds} rounds, {args.images} images, SQLite; uvicorn (1 process) on 127.0.0.1; asyncio keep-alive load generator, "
        f"{args.requests} requests per endpoint and concurrency (closed loop) after {args.warmup} warm-up requests; "
        f"{os.cpu_count()} CPUs shared with the load generator and any other work (1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after). Measured {report['measured_at']}.",
        "",
        "| endpoint | concurrency | requests | errors | p50 ms | p95 ms | p99 ms | max ms | req/s | response bytes | p95 < 50 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results.values():
        lines.append(f"| `{r['endpoint']}` | {r['concurrency']} | {r['requests_ok']} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['p99_ms']} | {r['max_ms']} | {r['throughput_rps']} | {r['response_bytes']} | {'yes' if r['p95_under_target'] else 'NO'} |")
    (args.out / "api_latency.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'api_latency.json'} and {args.out / 'api_latency.md'}")
    return 0 if report["all_under_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
