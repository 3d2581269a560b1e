"""HTTP figures with ``wrk`` (a C load generator): xiaoX against its framework's floor.

    python -m benchmarks http [--model DIR] [--wrk-seconds 8] [--wrk-connections 32]

In one run, for each server stack (uvicorn with uvloop + httptools, as ``uvicorn[standard]``
installs, and the fallback asyncio + h11, forced by hiding those two modules), on
127.0.0.1 at ``--wrk-connections`` connections:

- ``floor``: a bare sse-starlette endpoint streaming five fixed pieces
  (``benchmarks/floor/sse_floor.py``: the same Starlette, sse-starlette and uvicorn);
- ``generate, 5 tokens``: ``POST /v1/chat/completions`` streamed, generation only, every
  reply forced to five tokens (five pieces, as the floor);
- ``generate``: generation only with the model folder's generation settings;
- ``hybrid``: the hybrid mode (retrieved and generated candidates, reranked).

Also the same floor and five-token points with the Python client (httpx, as
``benchmarks.server_load``), and the xiaoX process's cold start (launch to /healthz 200,
the median of three launches) and peak RSS (VmHWM) with the hybrid index loaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, fmt, log, shown, stat_cpu_seconds
from benchmarks.processes import ServerProcess

FLOOR_APP = ROOT / "benchmarks" / "floor" / "sse_floor.py"
WRK_SCRIPT = ROOT / "benchmarks" / "floor" / "stream.lua"
STACKS = ("uvloop+httptools", "asyncio+h11")
QUESTION = "你好，今天过得怎么样"


class FloorProcess(ServerProcess):
    """The bare sse-starlette endpoint, in its own process."""

    def command(self) -> list[str]:
        return [sys.executable, str(FLOOR_APP), "--port", str(self.port)]


def fallback_path(workdir: Path) -> Path:
    """A folder whose ``uvloop`` and ``httptools`` fail to import: first on PYTHONPATH,
    uvicorn's ``auto`` falls back to asyncio and h11, as where they are not installed."""
    folder = workdir / "no-uvloop-httptools"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("uvloop", "httptools"):
        (folder / f"{name}.py").write_text(f"raise ImportError('{name} hidden by the "
                                           "benchmark')\n")
    return folder


def stack_env(stack: str, workdir: Path) -> dict[str, str]:
    if stack == STACKS[0]:
        return {}
    path = [str(fallback_path(workdir)), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": ":".join(p for p in path if p)}


def bodies(reply_tokens: int) -> dict[str, dict]:
    """What each xiaoX contender posts."""
    base = {"messages": [{"role": "user", "content": QUESTION}], "stream": True}
    return {
        f"generate, {reply_tokens} tokens": {**base, "reply_mode": "generate",
                                             "max_tokens": reply_tokens,
                                             "min_tokens": reply_tokens},
        "generate": {**base, "reply_mode": "generate"},
        "hybrid": {**base, "reply_mode": "hybrid"},
    }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(text: str) -> dict:
    """wrk's report (with --latency) as numbers: replies/s, latency percentiles, errors."""
    found = {"replies_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
             "requests": int(re.search(r"(\d+) requests in", text).group(1))}
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", text, re.M)
        found[f"p{q}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    found["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    found["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return found


def run_wrk(url: str, body: dict, connections: int, seconds: float) -> dict:
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    env = {**os.environ, "WRK_BODY": json.dumps(body, ensure_ascii=False)}
    command = [exe, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
               "--timeout", "10s", "-s", str(WRK_SCRIPT), url + "/v1/chat/completions"]
    before = _children_cpu_seconds()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
    found = parse_wrk(done.stdout)
    used = _children_cpu_seconds() - before  # wrk's own: it shares the machine's cores
    return {**found, "wrk_cpu_us_per_reply": 1e6 * used / max(1, found["requests"])}


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds so far of each thread of a process (/proc/PID/task)."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        used = stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        if used is not None:  # else the thread ended meanwhile
            seconds[int(tid)] = used
    return seconds


def engine_counters(url: str) -> dict[str, float]:
    """The engine's decoder steps and generated tokens so far, from ``/metrics``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    found = dict.fromkeys(("xiaox_engine_steps", "xiaox_generated_tokens"), float("nan"))
    for family in text_string_to_metric_families(text):
        if family.name in found and family.samples:
            found[family.name] = family.samples[0].value
    return found


def measured_point(server: ServerProcess, body: dict, connections: int,
                   seconds: float) -> dict:
    """A wrk point, with where the server's CPU went per reply (its event loop's thread,
    the others: xiaoX's engine step and preparer threads) and, for xiaoX, how full its
    decoder steps were: the process is bound by one GIL, so the split says who to cut."""
    assert server.proc is not None
    pid, engine = server.proc.pid, not isinstance(server, FloorProcess)
    cpu = thread_cpu_seconds(pid)
    counters = engine_counters(server.url) if engine else {}
    point = run_wrk(server.url, body, connections, seconds)
    cpu_after = thread_cpu_seconds(pid)
    counters_after = engine_counters(server.url) if engine else {}
    used = {t: cpu_after[t] - cpu.get(t, 0.0) for t in cpu_after}
    replies = max(1, point["requests"])
    steps = counters_after.get("xiaox_engine_steps", 0.0) - counters.get(
        "xiaox_engine_steps", 0.0)
    tokens = counters_after.get("xiaox_generated_tokens", 0.0) - counters.get(
        "xiaox_generated_tokens", 0.0)
    return {**point,
            "cpu_us_per_reply": {"event_loop": 1e6 * used.get(pid, 0.0) / replies,
                                 "other_threads": 1e6 * (sum(used.values())
                                                         - used.get(pid, 0.0)) / replies},
            "rows_per_step": tokens / steps if steps > 0 else None}


def wrk_command(args, stack: str, contender: str) -> str:
    return (f"python -m benchmarks http --model {shown(args.model)} --wrk-connections "
            f"{args.wrk_connections} --wrk-seconds {args.wrk_seconds:g} --reply-tokens "
            f"{args.http_reply_tokens}  # {stack}, {contender}")


def _python_client(url: str, body_extra: dict | None, args) -> dict:
    from benchmarks.server_load import drive

    c = args.wrk_connections
    return asyncio.run(drive([url], [QUESTION], requests=4 * c, concurrency=c,
                             seconds=args.wrk_seconds + 10,
                             reply_tokens=args.http_reply_tokens, extra=body_extra))


def _stack(args, stack: str, workdir: Path) -> dict:
    """One stack's points: xiaoX's contenders, then the floor, each warmed up first."""
    from benchmarks.server_load import peak_rss_mb

    env = {"XIAOX_THREADS": str(args.threads), "XIAOX_MAX_QUEUE": "1024",
           "XIAOX_MAX_BATCH_SIZE": "32", **stack_env(stack, workdir)}
    server = ServerProcess(args.model, workdir, env=env)
    launches = []
    for last in (False, False, True):  # one launch is noisy here: the median of three
        started = time.perf_counter()
        server.launch().wait_healthy(120)
        launches.append(time.perf_counter() - started)
        if not last:
            server.stop()
    entry: dict = {"cold_start_s": statistics.median(launches),
                   "cold_starts_s": launches, "points": {}}
    c, seconds = args.wrk_connections, args.wrk_seconds
    try:
        for name, body in bodies(args.http_reply_tokens).items():
            log(f"  wrk {stack}: xiaoX {name}, {c} connections, {seconds:g} s ...")
            run_wrk(server.url, body, c, 1)  # warm-up
            entry["points"][name] = {**measured_point(server, body, c, seconds),
                                     "command": wrk_command(args, stack, name)}
        five = f"generate, {args.http_reply_tokens} tokens"
        entry["python_client"] = {five: _python_client(server.url,
                                                       {"reply_mode": "generate"}, args)}
        entry["peak_rss_mb"] = peak_rss_mb(server.proc.pid) if server.proc else None
    finally:
        server.stop()
    floor = FloorProcess(args.model, workdir, env=stack_env(stack, workdir))
    floor.launch().wait_healthy(60)
    try:
        log(f"  wrk {stack}: floor, {c} connections, {seconds:g} s ...")
        run_wrk(floor.url, {}, c, 1)
        entry["points"]["floor"] = {**measured_point(floor, {}, c, seconds),
                                    "command": wrk_command(args, stack, "floor")}
        entry["python_client"]["floor"] = _python_client(floor.url, None, args)
    finally:
        floor.stop()
    return entry


def ratios(data: dict) -> dict:
    """The targets' ratios within each stack."""
    found = {}
    five = f"generate, {data['reply_tokens']} tokens"
    for stack, entry in data["stacks"].items():
        p = entry["points"]
        found[stack] = {
            "generate_vs_floor": p[five]["replies_per_s"] / p["floor"]["replies_per_s"],
            "hybrid_vs_generate": p["hybrid"]["replies_per_s"] / p["generate"]["replies_per_s"],
            "hybrid_p99_ms": p["hybrid"]["p99_ms"],
        }
    a, b = (data["stacks"].get(s) for s in STACKS)
    if a and b:
        found["standard_vs_fallback"] = {
            name: a["points"][name]["replies_per_s"] / b["points"][name]["replies_per_s"]
            for name in a["points"]}
    return found


def run(args, workdir: Path) -> tuple[str, dict]:
    data: dict = {"model": Path(args.model).name, "connections": args.wrk_connections,
                  "seconds": args.wrk_seconds, "reply_tokens": args.http_reply_tokens,
                  "threads": args.threads, "cores": os.cpu_count(), "stacks": {}}
    for stack in STACKS:
        log(f"http: the {stack} stack ...")
        data["stacks"][stack] = _stack(args, stack, workdir)
    data["ratios"] = ratios(data)
    return report(data), data


def _reply_cpu_us(point: dict) -> float | None:
    """The server's and wrk's CPU per reply of a point, together."""
    if "cpu_us_per_reply" not in point or "wrk_cpu_us_per_reply" not in point:
        return None
    return sum(point["cpu_us_per_reply"].values()) + point["wrk_cpu_us_per_reply"]


def _cores_busy(point: dict) -> float | None:
    used = _reply_cpu_us(point)
    return None if used is None else used * point["replies_per_s"] / 1e6


def _budget_lines(data: dict) -> list[str]:
    """What the generation-only target would cost this machine: xiaoX's and wrk's CPU per
    reply, measured, at 85% of the floor's rate."""
    five = f"generate, {data['reply_tokens']} tokens"
    lines = []
    for stack, entry in data["stacks"].items():
        point, floor = entry["points"].get(five, {}), entry["points"].get("floor", {})
        used = _reply_cpu_us(point)
        if used is None or not floor:
            continue
        wanted = 0.85 * floor["replies_per_s"]
        lines.append(f"- {stack}: 85% of the floor is {wanted:.0f} replies/s; at the CPU "
                     f"per reply measured here (xiaoX and wrk, {used:.0f} us) that needs "
                     f"{used * wanted / 1e6:.2f} cores; the machine has "
                     f"{data.get('cores', '?')}")
    return ["", *lines] if lines else []


def report(data: dict) -> str:
    five = f"generate, {data['reply_tokens']} tokens"
    lines = [
        "## HTTP with wrk: xiaoX against its framework's floor", "",
        f"- model folder `{Path(data['model']).name}`; `wrk -t1 -c{data['connections']} "
        f"-d{data['seconds']:g}s --latency -s benchmarks/floor/stream.lua` (a streaming "
        "POST /v1/chat/completions) on 127.0.0.1; latency = the whole streamed reply",
        "- floor: `benchmarks/floor/sse_floor.py`, a bare sse-starlette endpoint streaming "
        "five fixed pieces on the same Starlette, sse-starlette and uvicorn",
        f"- `{five}`: generation only, every reply forced to {data['reply_tokens']} tokens; "
        "`generate`/`hybrid`: the folder's generation settings",
        f"- {data['threads']} onnxruntime thread(s); wrk and the server share the machine",
        "",
        "| stack | contender | replies/s | p50 ms | p90 ms | p99 ms | non-2xx | socket "
        "errors | command |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for stack, entry in data["stacks"].items():
        for name, p in entry["points"].items():
            lines.append(f"| {stack} | {name} | {p['replies_per_s']:.1f} | {fmt(p['p50_ms'])} "
                         f"| {fmt(p['p90_ms'])} | {fmt(p['p99_ms'])} | {p['non_2xx']} | "
                         f"{p['socket_errors']} | `{p['command']}` |")
    lines += ["", "The same with the Python client (httpx, `benchmarks.server_load`), "
              f"{data['connections']} clients:", "",
              "| stack | contender | replies | errors | replies/s | TTFT p50 ms | "
              "e2e p50 ms | e2e p99 ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: "
              "| ---: |"]
    for stack, entry in data["stacks"].items():
        for name, p in entry["python_client"].items():
            lines.append(f"| {stack} | {name} | {p['replies']} | {p['errors']} | "
                         f"{p['replies_per_s']:.1f} | {fmt(p['ttft_p50_ms'])} | "
                         f"{fmt(p['e2e_p50_ms'])} | {fmt(p['e2e_p99_ms'])} |")
    lines += ["", "| stack | xiaoX cold start s (hybrid index; median of 3 launches) | peak "
              "RSS MB | "
              f"{five} / floor | hybrid / generate | hybrid p99 ms |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for stack, entry in data["stacks"].items():
        r = data["ratios"][stack]
        launches = " / ".join(f"{x:.2f}" for x in entry.get("cold_starts_s", []))
        lines.append(f"| {stack} | {entry['cold_start_s']:.2f} ({launches}) | "
                     f"{fmt(entry['peak_rss_mb'], 0)}"
                     f" | {r['generate_vs_floor']:.2f} | {r['hybrid_vs_generate']:.2f} | "
                     f"{fmt(r['hybrid_p99_ms'])} |")
    lines += ["", "Where the CPU went per reply (the server's threads read from /proc before "
              "and after each point, wrk's from its rusage), the cores that kept busy, and "
              "the rows of xiaoX's decoder steps:", "", "| stack | contender | event loop "
              "us/reply | other threads (engine) us/reply | wrk us/reply | cores busy | rows "
              "per decoder step |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for stack, entry in data["stacks"].items():
        for name, p in entry["points"].items():
            if "cpu_us_per_reply" in p:
                cpu = p["cpu_us_per_reply"]
                lines.append(f"| {stack} | {name} | {cpu['event_loop']:.0f} | "
                             f"{cpu['other_threads']:.0f} | {fmt(p.get('wrk_cpu_us_per_reply'), 0)}"
                             f" | {fmt(_cores_busy(p), 2)} | {fmt(p['rows_per_step'])} |")
    lines += _budget_lines(data)
    if "standard_vs_fallback" in data["ratios"]:
        pairs = ", ".join(f"{k} {v:.2f}x" for k, v in
                          data["ratios"]["standard_vs_fallback"].items())
        lines += ["", f"uvloop + httptools vs asyncio + h11 (replies/s): {pairs}"]
    return "\n".join(lines)
