"""A bounded HTTP load client for the API, for loopback tests and benchmarks: `clients` concurrent
clients, each sending its share of requests in turn over a keep-alive connection, every request's
send and answer times and status recorded (`tests/serve/test_load.py`, `benchmarks/serve.py`)."""

from __future__ import annotations

import asyncio
import base64
import io
import statistics
import threading
import time
from dataclasses import dataclass

import aiohttp


@dataclass
class Call:
    """One request of a load run: when it was sent and answered (perf_counter s) and its status
    (0: no HTTP answer, e.g. the connection was dropped)."""

    route: str
    start: float
    end: float
    status: int


async def _client(session, base: str, requests: list[tuple], count: int, stop, calls: list[Call]) -> None:
    for j in range(count):
        if stop is not None and stop.is_set():
            return
        method, route, body = requests[j % len(requests)]
        start = time.perf_counter()
        try:
            async with session.request(method, base + route, json=body) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        calls.append(Call(route, start, time.perf_counter(), status))


def drive(
    base: str,
    key: str | None,
    requests: list[tuple[str, str, dict | None]],
    clients: int,
    per_client: int,
    stop: threading.Event | None = None,
    calls: list[Call] | None = None,
    timeout_s: float = 300,
) -> list[Call]:
    """`clients` concurrent clients, each sending `per_client` requests (method, route, JSON body) in
    turn, client i starting at requests[i % len]; a client stops early once `stop` is set. Each
    answered request is appended to `calls` as it comes (to watch a run from another thread); a
    request unanswered after `timeout_s` counts as status 0."""
    calls = [] if calls is None else calls

    async def run() -> list[Call]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=clients),
        ) as session:
            await asyncio.gather(
                *(
                    _client(
                        session,
                        base,
                        requests[i % len(requests) :] + requests[: i % len(requests)],
                        per_client,
                        stop,
                        calls,
                    )
                    for i in range(clients)
                )
            )
        return calls

    return asyncio.run(run())


def summary(calls: list[Call]) -> dict:
    """Requests, errors (not 200), answered requests/s over the run's wall time, p50 and p99 in ms."""
    latencies = sorted((c.end - c.start) * 1000 for c in calls)
    wall = max(c.end for c in calls) - min(c.start for c in calls)
    centiles = statistics.quantiles(latencies, n=100, method="inclusive")
    ok = sum(c.status == 200 for c in calls)
    return {
        "requests": len(calls),
        "errors": len(calls) - ok,
        "requests_per_s": round(ok / wall, 1),
        "p50_ms": round(centiles[49], 1),
        "p99_ms": round(centiles[98], 1),
    }


def png(image) -> str:
    """An image as the API takes it: PNG bytes in base64."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
