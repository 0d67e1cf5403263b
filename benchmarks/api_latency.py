"""Latency of the managers' API with 100 rounds in the store: GET /rounds/{id} and GET /projects/{id}/progress.

Seeds a sample store (api.sample_data), serves it with uvicorn in its own process on 127.0.0.1, loads it with a
bounded loopback load generator (httpx, a fixed number of requests at a fixed concurrency, and a time cap), and
writes p50/p95/p99 per endpoint as JSON and markdown into --out. Target: p95 < 50 ms.

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


async def load(base_url: str, paths: list[str], *, concurrency: int, time_cap_s: float) -> tuple[list[float], int, float]:
    """Send every path once, `concurrency` at a time; latency per request in ms, errors, wall time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    deadline = started + time_cap_s

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            try:
                path = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            sent = time.perf_counter()
            try:
                response = await client.get(path)
                await response.aread()
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            elapsed_ms = (time.perf_counter() - sent) * 1000
            if ok:
                latencies.append(elapsed_ms)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits, timeout=30.0) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
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
    parser.add_argument("--requests", type=int, default=400, help="measured requests per endpoint")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per endpoint first")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--time-cap-s", type=float, default=120.0, help="stop each endpoint's load after this long")
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
            results = {}
            for name, make in endpoints.items():
                asyncio.run(load(base_url, [make() for _ in range(args.warmup)], concurrency=args.concurrency, time_cap_s=args.time_cap_s))
                latencies, errors, wall_s = asyncio.run(
                    load(base_url, [make() for _ in range(args.requests)], concurrency=args.concurrency, time_cap_s=args.time_cap_s)
                )
                results[name] = {**summarize(latencies, errors, wall_s), "response_bytes": sizes[name]}
                print(f"{name}: {results[name]}")
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)

    report = {
        "benchmark": "api_latency",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target_p95_ms": TARGET_P95_MS,
        "store": {"rounds": args.rounds, "images": args.images, "backend": "sqlite", "seeding_s": round(seeding_s, 1)},
        "load": {"requests_per_endpoint": args.requests, "warmup_per_endpoint": args.warmup, "concurrency": args.concurrency,
                 "client": "httpx.AsyncClient over loopback", "server": "uvicorn, 1 process", "time_cap_s": args.time_cap_s},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "endpoints": results,
        "all_under_target": all(r["p95_under_target"] for r in results.values()),
    }
    (args.out / "api_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# API latency with 100 rounds in the store",
        "",
        f"{args.rounds} rounds, {args.images} images, SQLite; uvicorn (1 process) on 127.0.0.1; httpx load generator, "
        f"{args.requests} requests per endpoint at concurrency {args.concurrency} after {args.warmup} warm-up requests; "
        f"{os.cpu_count()} CPUs shared with the load generator. Measured {report['measured_at']}.",
        "",
        "| endpoint | requests | errors | p50 ms | p95 ms | p99 ms | max ms | req/s | response bytes | p95 < 50 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        lines.append(f"| `{name}` | {r['requests_ok']} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} | "
                     f"{r['throughput_rps']} | {r['response_bytes']} | {'yes' if r['p95_under_target'] else 'NO'} |")
    (args.out / "api_latency.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'api_latency.json'} and {args.out / 'api_latency.md'}")
    return 0 if report["all_under_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
