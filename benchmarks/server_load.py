"""Server load: an asyncio SSE client against servers it starts on 127.0.0.1.

    python -m benchmarks server [--profile quick|full] [--setups on,off,two,baseline]
                                [--concurrency 1,8,32,128] [--poisson-rate 20]

Every request is ``POST /v1/chat/completions`` with ``stream: true``, generation only and
greedy (``reply_mode: generate``, ``temperature: 0``) and a reply forced to
``--reply-tokens`` tokens
(``min_tokens`` = ``max_tokens``). Per point: time to first
token (first chunk with content), inter-token latency (gaps between content chunks),
end-to-end latency, replies/s, errors. Each point is bounded by a request count and by
``--seconds``; requests still running then are cancelled and counted as unfinished.

Setups (all on the same weights, each server with ``--threads`` onnxruntime threads):
  on        one ``python -m serve`` process, continuous batching (--max-batch-size 32)
  off       the same with batching off (--max-batch-size 1): one request at a time
  two       two ``python -m serve`` processes sharing one Redis, clients split between them
  baseline  the original's architecture: TensorFlow, one request at a time, same routes
            (``benchmarks/baseline.py``)
Per setup: cold start (process start to /healthz 200) and peak RSS (VmHWM) per process.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import (
    child_pids,
    fmt,
    log,
    peak_rss_mb,
    percentile,
    questions_of,
    stat_cpu_seconds,
)
from benchmarks.processes import ServerProcess, free_port

SETUPS = ("on", "off", "two", "baseline")
# Generation only, greedy, as the TensorFlow baseline decodes: the exported folders have a
# reply index (whose hybrid mode would choose a whole reply and stream it at once: its
# cost is ``benchmarks.wrk_load``'s and ``hybrid``'s) and sampling defaults, and the
# benchmark's few-step weights give near-uniform rows whose nucleus is most of the
# vocabulary, which no trained model has (the shipped one is sampled in ``wrk_load``).
GENERATE = {"reply_mode": "generate", "temperature": 0}
SETUP_TITLES = {
    "on": "ours, 1 process, continuous batching (max-batch-size 32)",
    "off": "ours, 1 process, batching off (max-batch-size 1)",
    "two": "ours, 2 processes sharing Redis, batching on",
    "baseline": "baseline: TensorFlow step loop, one request at a time",
}


# --- the client ------------------------------------------------------------------------

@dataclass
class Outcome:
    started: float
    first_token: float | None = None
    ended: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def one_request(client: httpx.AsyncClient, question: str, reply_tokens: int,
                      outcome: Outcome, extra: dict | None = None) -> None:
    body = {"messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": reply_tokens, "min_tokens": reply_tokens, **(extra or {})}
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                outcome.error = f"HTTP {response.status_code}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    outcome.ended = time.perf_counter()
                    break
                # The server writes compact JSON: a string test keeps the client cheap
                # (at 128 streams a full parse per chunk would load the shared cores).
                if '"content":"' in payload and '"content":""' not in payload:
                    now = time.perf_counter()
                    if outcome.first_token is None:
                        outcome.first_token = now
                    else:
                        outcome.gaps.append(now - last)
                    last = now
                    outcome.tokens += 1
            if outcome.ended is None:
                outcome.error = "stream ended without [DONE]"
    except httpx.HTTPError as e:
        outcome.error = type(e).__name__


async def drive(urls: list[str], questions: list[str], *, requests: int, concurrency: int,
                seconds: float, reply_tokens: int, poisson_rate: float | None = None,
                extra: dict | None = None) -> dict:
    """Closed loop of ``concurrency`` clients, or Poisson arrivals at ``poisson_rate``/s
    (open loop); ``requests`` in all, split round-robin over ``urls``; ``extra``: more
    fields of every request's body. Summary dict."""
    limits = httpx.Limits(max_connections=concurrency + 8 if not poisson_rate else requests,
                          max_keepalive_connections=concurrency + 8)
    timeout = httpx.Timeout(seconds + 30, connect=10)
    clients = [httpx.AsyncClient(base_url=u, limits=limits, timeout=timeout) for u in urls]
    outcomes: list[Outcome] = []
    counter = iter(range(requests))
    started = time.perf_counter()
    deadline = started + seconds

    async def request(i: int) -> None:
        outcome = Outcome(time.perf_counter())
        outcomes.append(outcome)
        await one_request(clients[i % len(clients)], questions[i % len(questions)],
                          reply_tokens, outcome, extra)

    async def closed_loop_client() -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            await request(i)

    async def poisson_arrivals() -> None:
        rng = random.Random(1)
        tasks = []
        for i in range(requests):
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(request(i)))
            await asyncio.sleep(rng.expovariate(poisson_rate))
        await asyncio.gather(*tasks)

    work = poisson_arrivals() if poisson_rate else asyncio.gather(
        *(closed_loop_client() for _ in range(concurrency)))
    try:
        # Started requests may finish after the deadline, within a grace period.
        await asyncio.wait_for(work, timeout=seconds + 30)
    except TimeoutError:
        pass
    finally:
        for client in clients:
            await client.aclose()
    return summarize(outcomes, started)


def summarize(outcomes: list[Outcome], started: float) -> dict:
    done = [o for o in outcomes if o.error is None and o.ended is not None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    unfinished = sum(1 for o in outcomes if o.error is None and o.ended is None)
    end = max((o.ended for o in done), default=time.perf_counter())
    wall = max(end - started, 1e-9)
    ms = 1000.0

    def pct(values: list[float], q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else p * ms

    ttft = [o.first_token - o.started for o in done if o.first_token is not None]
    gaps = [g for o in done for g in o.gaps]
    e2e = [o.ended - o.started for o in done]
    return {
        "requests": len(outcomes), "replies": len(done), "errors": sum(errors.values()),
        "error_kinds": errors, "unfinished": unfinished, "seconds": wall,
        "replies_per_s": len(done) / wall,
        "tokens_per_s": sum(o.tokens for o in done) / wall,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
        "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99),
    }


# --- the servers -----------------------------------------------------------------------

class BaselineProcess(ServerProcess):
    """``python -m benchmarks.baseline``: the app with the TensorFlow engine."""

    def __init__(self, model_dir: Path, workdir: Path, checkpoint: Path, threads: int, *,
                 redis_url: str | None = None):
        super().__init__(model_dir, workdir, redis_url=redis_url)
        self.checkpoint, self.threads = checkpoint, threads

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "benchmarks.baseline", "--checkpoint",
                   str(self.checkpoint), "--model", str(self.model_dir), "--port",
                   str(self.port), "--threads", str(self.threads)]
        return command + (["--redis-url", self.redis_url] if self.redis_url else [])

    def environment(self) -> dict[str, str]:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOX_")}
        env.update({"XIAOX_SECRET_KEY_FILE": str(self.workdir / "secret_key"),
                    "XIAOX_LOG_LEVEL": "warning", "XIAOX_MAX_QUEUE": "1024",
                    "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2",
                    "PYTHONUNBUFFERED": "1"})
        return env


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (/proc/PID/stat)."""
    return sum(stat_cpu_seconds(f"/proc/{pid}/stat") or 0.0 for pid in pids)


def start_setup(setup: str, weights, threads: int, workdir: Path,
                redis_url: str | None) -> tuple[list[ServerProcess], list[float]]:
    """Launch the setup's processes; (processes, cold-start seconds of each)."""
    env = {"XIAOX_THREADS": str(threads), "XIAOX_MAX_QUEUE": "1024",
           "XIAOX_MAX_BATCH_SIZE": "1" if setup == "off" else "32"}
    if setup == "baseline":
        servers: list[ServerProcess] = [BaselineProcess(weights.int8_dir, workdir,
                                                        weights.checkpoint, threads,
                                                        redis_url=redis_url)]
    else:
        servers = [ServerProcess(weights.int8_dir, workdir, redis_url=redis_url, env=env)
                   for _ in range(2 if setup == "two" else 1)]
    launched = []
    for server in servers:
        while server.port in {s.port for s in servers if s is not server}:
            server.port = free_port()
        launched.append(time.perf_counter())
        server.launch()
    cold = []
    for server, at in zip(servers, launched, strict=True):
        server.wait_healthy(timeout=180)
        cold.append(time.perf_counter() - at)
    return servers, cold


class Redis:
    """A throwaway redis-server on a free port (no persistence)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (the setups share one Redis)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir",
                                      str(workdir)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# --- the run -------------------------------------------------------------------------------

def requests_for(args, concurrency: int) -> int:
    if args.requests:
        return args.requests
    return max(args.min_requests, args.requests_per_client * concurrency)


def point_command(args, setup: str, concurrency: int | None, requests: int) -> str:
    parts = ["python -m benchmarks server", f"--setups {setup}"]
    if concurrency is None:
        parts += ["--concurrency none", f"--poisson-rate {args.poisson_rate:g}"]
    else:
        parts += [f"--concurrency {concurrency}", "--poisson-rate 0"]
    parts += [f"--requests {requests}", f"--seconds {args.seconds:g}",
              f"--reply-tokens {args.reply_tokens}", f"--threads {args.threads}",
              f"--questions {args.questions}"]
    if args.checkpoint:
        parts.append(f"--checkpoint {args.checkpoint}")
    return " ".join(parts)


def run(args, weights, command: str) -> tuple[str, dict]:
    questions = questions_of(weights.checkpoint, args.questions)
    data: dict = {"command": command, "weights": weights.origin, "dims": weights.dims,
                  "threads": args.threads, "reply_tokens": args.reply_tokens,
                  "seconds_per_point": args.seconds, "setups": {}}
    workdir = Path(tempfile.mkdtemp(prefix="xiaox-bench-server-"))
    redis = Redis(workdir)
    try:
        for setup in args.setups:
            log(f"server setup '{setup}': starting ...")
            servers, cold = start_setup(setup, weights, args.threads, workdir, redis.url)
            entry: dict = {"title": SETUP_TITLES[setup], "cold_start_s": cold, "points": []}
            data["setups"][setup] = entry
            try:
                urls = [s.url for s in servers]
                asyncio.run(drive(urls, questions, requests=2 * len(urls), concurrency=len(urls),
                                  seconds=30, reply_tokens=args.reply_tokens,
                                  extra=GENERATE))  # warm-up
                points: list[int | None] = list(args.concurrency)
                if args.poisson_rate:
                    points.append(None)
                for concurrency in points:
                    n = requests_for(args, concurrency or 8)
                    if concurrency is None:
                        n = max(args.min_requests, round(args.poisson_rate * args.seconds / 2))
                        if args.requests:
                            n = args.requests
                    load = (f"Poisson {args.poisson_rate:g}/s" if concurrency is None
                            else f"{concurrency} clients")
                    log(f"  {setup}: {load}, {n} requests ...")
                    # the servers and their engine processes (XIAOX_ENGINE_PROCESS)
                    pids = [p for s in servers if s.proc
                            for p in (s.proc.pid, *child_pids(s.proc.pid))]
                    server_cpu, client_cpu = cpu_seconds(pids), time.process_time()
                    result = asyncio.run(drive(urls, questions, requests=n,
                                               concurrency=concurrency or 0,
                                               seconds=args.seconds,
                                               reply_tokens=args.reply_tokens,
                                               poisson_rate=None if concurrency else
                                               args.poisson_rate, extra=GENERATE))
                    # Who used the two cores: the servers, or the load client itself?
                    result["server_cpu_percent"] = 100 * (
                        cpu_seconds(pids) - server_cpu) / result["seconds"]
                    result["client_cpu_percent"] = 100 * (
                        time.process_time() - client_cpu) / result["seconds"]
                    result["concurrency"] = concurrency
                    result["load"] = load
                    result["command"] = point_command(args, setup, concurrency, n)
                    entry["points"].append(result)
                entry["peak_rss_mb"] = [  # a server and its engine process, together
                    sum(peak_rss_mb(p) or 0.0 for p in (s.proc.pid, *child_pids(s.proc.pid)))
                    for s in servers if s.proc]
            finally:
                for server in servers:
                    server.stop()
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report(data), data


def _point(data: dict, setup: str, concurrency: int | None) -> dict | None:
    for p in data["setups"].get(setup, {}).get("points", []):
        if p["concurrency"] == concurrency:
            return p
    return None


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.1f}x"


def _point_lines(data: dict) -> list[str]:
    lines = [
        "## Server under load (HTTP, SSE, 127.0.0.1)",
        "",
        f"- weights: {data['weights']}",
        f"- POST /v1/chat/completions, stream true, every reply forced to "
        f"{data['reply_tokens']} tokens; {data['threads']} onnxruntime/TensorFlow "
        f"thread(s) per server process; the load client runs on the same machine",
        f"- each point bounded by its request count and {data['seconds_per_point']:g} s; "
        "unfinished = still running at the bound (cancelled); CPU % = CPU seconds of the "
        "server process(es) / of the load client over the point's wall time (100 = one core)",
        "",
        "| setup | load | replies | errors | unfinished | replies/s | TTFT p50 ms | "
        "TTFT p99 ms | ITL p50 ms | ITL p99 ms | e2e p50 ms | e2e p99 ms | server CPU % | "
        "client CPU % | command |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | --- |",
    ]
    for setup, entry in data["setups"].items():
        for p in entry["points"]:
            lines.append(
                f"| {setup} | {p['load']} | {p['replies']} | {p['errors']} | "
                f"{p['unfinished']} | {p['replies_per_s']:.1f} | {fmt(p['ttft_p50_ms'])} | "
                f"{fmt(p['ttft_p99_ms'])} | {fmt(p['itl_p50_ms'], 2)} | "
                f"{fmt(p['itl_p99_ms'], 2)} | {fmt(p['e2e_p50_ms'])} | "
                f"{fmt(p['e2e_p99_ms'])} | {p['server_cpu_percent']:.0f} | "
                f"{p['client_cpu_percent']:.0f} | `{p['command']}` |")
    lines += ["", "Setups:", ""]
    return lines + [f"- `{setup}`: {entry['title']}" for setup, entry in data["setups"].items()]


def _process_lines(data: dict) -> list[str]:
    lines = [
        "",
        "### Process: cold start and peak memory",
        "",
        "| setup | cold start s (process start to /healthz 200) | peak RSS MB (VmHWM, a "
        "server and its engine process together) "
        "| command |",
        "| --- | ---: | ---: | --- |",
    ]
    for setup, entry in data["setups"].items():
        cold = " / ".join(f"{s:.1f}" for s in entry["cold_start_s"])
        rss = " / ".join(fmt(r, 0) for r in entry.get("peak_rss_mb", []))
        first = entry["points"][0]["command"] if entry["points"] else data["command"]
        lines.append(f"| {setup} | {cold} | {rss} | `{first}` |")
    return lines


def _rps(p: dict | None) -> float | None:
    return None if p is None else p["replies_per_s"]


def _ttft(p: dict | None) -> float | None:
    return None if p is None else p["ttft_p50_ms"]


def _ratio_lines(data: dict) -> list[str]:
    loads = sorted({p["concurrency"] for e in data["setups"].values() for p in e["points"]},
                   key=lambda c: (c is None, c or 0))
    lines = [
        "",
        "### Ratios (same run)",
        "",
        "| load | batching on / off (replies/s) | ours / baseline (replies/s) | "
        "baseline / ours (TTFT p50) | two processes / one (replies/s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c in loads:
        on, off = _point(data, "on", c), _point(data, "off", c)
        base, two = _point(data, "baseline", c), _point(data, "two", c)
        label = "Poisson" if c is None else f"{c} clients"
        lines.append(f"| {label} | {_ratio(_rps(on), _rps(off))} | "
                     f"{_ratio(_rps(on), _rps(base))} | {_ratio(_ttft(base), _ttft(on))} | "
                     f"{_ratio(_rps(two), _rps(on))} |")
    return lines


def report(data: dict) -> str:
    return "\n".join([*_point_lines(data), *_process_lines(data), *_ratio_lines(data)])
