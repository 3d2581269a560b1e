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
- ``hybrid``: the hybrid mode (retrieved and generated candidates, reranked);
- the same three against a server with its engine in a process of its own
  (``XIAOX_ENGINE_PROCESS=1``), named ``..., engine process``;
- ``web layer, free engine``: the five-token body against xiaoX's server with
  ``benchmarks/floor/free_engine.py`` for its engine (no model work).

Also the same floor and five-token points with the Python client (httpx, as
``benchmarks.server_load``), and each engine mode's cold start (launch to /healthz 200,
the median of three launches) and peak RSS (VmHWM, each process) with the hybrid index
loaded. ``benchmarks.wrk_report`` makes the ratios and the markdown.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    ROOT,
    child_pids,
    log,
    peak_rss_mb,
    pss_mb,
    shown,
    stat_cpu_seconds,
)
from benchmarks.processes import ServerProcess
from benchmarks.wrk_report import ENGINE_PROCESS, FREE, ONE_PROCESS, STACKS, ratios, report

FLOOR_APP = ROOT / "benchmarks" / "floor" / "sse_floor.py"
FREE_ENGINE = "free_engine:FreeEngine"  # benchmarks/floor/free_engine.py
MODES = {ONE_PROCESS: {"XIAOX_ENGINE_PROCESS": "0"}, ENGINE_PROCESS: {"XIAOX_ENGINE_PROCESS": "1"}}
WRK_SCRIPT = ROOT / "benchmarks" / "floor" / "stream.lua"
QUESTION = "你好，今天过得怎么样"


class FloorProcess(ServerProcess):
    """The bare sse-starlette endpoint, in its own process."""

    def command(self) -> list[str]:
        return [sys.executable, str(FLOOR_APP), "--port", str(self.port)]


def free_engine_env(stack_environment: dict[str, str]) -> dict[str, str]:
    """xiaoX's server with ``FreeEngine``: its web layer's cost with no model work."""
    path = [str(FLOOR_APP.parent), stack_environment.get("PYTHONPATH",
                                                          os.environ.get("PYTHONPATH", ""))]
    return {**stack_environment, "XIAOX_ENGINE": FREE_ENGINE,
            "PYTHONPATH": ":".join(p for p in path if p)}


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


def _process_cpu_seconds(pids: list[int]) -> float:
    return sum(stat_cpu_seconds(f"/proc/{p}/stat") or 0.0 for p in pids)


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
    the others: xiaoX's engine step and preparer threads, and its engine process if it
    has one) and, for xiaoX, how full its decoder steps were."""
    assert server.proc is not None
    pid, engine = server.proc.pid, not isinstance(server, FloorProcess)
    children = child_pids(pid)  # an engine process
    cpu, child_cpu = thread_cpu_seconds(pid), _process_cpu_seconds(children)
    counters = engine_counters(server.url) if engine else {}
    point = run_wrk(server.url, body, connections, seconds)
    cpu_after, child_after = thread_cpu_seconds(pid), _process_cpu_seconds(children)
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
                                                         - used.get(pid, 0.0)) / replies,
                                 "engine_process": 1e6 * (child_after - child_cpu) / replies},
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
    """One stack's points: xiaoX's contenders in each engine mode, the web layer with a
    free engine, then the floor, each warmed up first. The floor's server runs the whole
    time: each generation-only point is measured between two floor points
    (``floor_around``), its ratio's baseline, as this machine's speed drifts by a third
    within minutes."""
    env = {"XIAOX_THREADS": str(args.threads), "XIAOX_MAX_QUEUE": "1024",
           "XIAOX_MAX_BATCH_SIZE": "32", **stack_env(stack, workdir)}
    entry: dict = {"points": {}, "modes": {}}
    floor = FloorProcess(args.model, workdir, env=stack_env(stack, workdir))
    floor.launch().wait_healthy(60)
    c, seconds = args.wrk_connections, args.wrk_seconds
    try:
        run_wrk(floor.url, {}, c, 1)  # warm-up
        for mode, extra in MODES.items():
            entry["modes"][mode] = _xiaox_points(args, stack, workdir, {**env, **extra},
                                                 mode, entry["points"], floor)
        one = entry["modes"][ONE_PROCESS]  # the keys of the runs before the modes
        entry.update(cold_start_s=one["cold_start_s"], cold_starts_s=one["cold_starts_s"],
                     peak_rss_mb=one["peak_rss_mb"], python_client=one.pop("python_client"))
        entry["points"][FREE] = _free_engine_point(args, stack, workdir, env)
        log(f"  wrk {stack}: floor, {c} connections, {seconds:g} s ...")
        entry["points"]["floor"] = {**measured_point(floor, {}, c, seconds),
                                    "command": wrk_command(args, stack, "floor")}
        entry["python_client"]["floor"] = _python_client(floor.url, None, args)
    finally:
        floor.stop()
    return entry


def _between_floor_points(floor: FloorProcess, measure, connections: int,
                          seconds: float) -> dict:
    """``measure()``'s point with the floor's replies/s just before and just after it."""
    before = run_wrk(floor.url, {}, connections, seconds)["replies_per_s"]
    point = measure()
    after = run_wrk(floor.url, {}, connections, seconds)["replies_per_s"]
    return {**point, "floor_around": {"before": before, "after": after}}


def _xiaox_points(args, stack: str, workdir: Path, env: dict[str, str], mode: str,
                  points: dict, floor: FloorProcess) -> dict:
    """xiaoX's contenders in one engine mode (into ``points``, named with the mode; the
    generation-only one between two points of ``floor``) and the mode's cold start (the
    median of three launches) and peak RSS."""
    server = ServerProcess(args.model, workdir, env=env)
    launches = []
    for last in (False, False, True):  # one launch is noisy here: the median of three
        started = time.perf_counter()
        server.launch().wait_healthy(120)
        launches.append(time.perf_counter() - started)
        if not last:
            server.stop()
    found: dict = {"cold_start_s": statistics.median(launches), "cold_starts_s": launches}
    c, seconds = args.wrk_connections, args.wrk_seconds
    five = f"generate, {args.http_reply_tokens} tokens"
    try:
        for name, body in bodies(args.http_reply_tokens).items():
            log(f"  wrk {stack}: xiaoX {name}{mode}, {c} connections, {seconds:g} s ...")
            run_wrk(server.url, body, c, 1)  # warm-up
            measure = functools.partial(measured_point, server, body, c, seconds)
            point = _between_floor_points(floor, measure, c, seconds) if name == five \
                else measure()
            points[name + mode] = {**point, "command": wrk_command(args, stack, name + mode)}
        if mode == ONE_PROCESS:
            found["python_client"] = {five: _python_client(server.url,
                                                           {"reply_mode": "generate"}, args)}
        pids = [server.proc.pid, *child_pids(server.proc.pid)]
        parts, shared = [peak_rss_mb(pid) for pid in pids], [pss_mb(pid) for pid in pids]
        # RSS counts the pages two processes share (libraries, the mapped dictionary) in
        # each; PSS splits them: its sum is what the server's processes hold together.
        found.update(peak_rss_mb=sum(p or 0.0 for p in parts), peak_rss_parts_mb=parts,
                     pss_mb=sum(p or 0.0 for p in shared), pss_parts_mb=shared)
    finally:
        server.stop()
    return found


def _free_engine_point(args, stack: str, workdir: Path, env: dict[str, str]) -> dict:
    """The five-token body against xiaoX's server with ``FreeEngine``."""
    body = bodies(args.http_reply_tokens)[f"generate, {args.http_reply_tokens} tokens"]
    server = ServerProcess(args.model, workdir, env=free_engine_env(env))
    server.start()
    try:
        _check_free_reply(server.url, body)
        log(f"  wrk {stack}: {FREE}, {args.wrk_connections} connections ...")
        run_wrk(server.url, body, args.wrk_connections, 1)
        return {**measured_point(server, body, args.wrk_connections, args.wrk_seconds),
                "command": wrk_command(args, stack, FREE)}
    finally:
        server.stop()


def _check_free_reply(url: str, body: dict) -> None:
    """The server answers with the free engine's pieces, not a model's reply."""
    import urllib.request

    request = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    contents = re.findall(r'"content":"([^"]*)"', text)
    if "".join(contents) != "你好，很高兴认识你":
        raise RuntimeError(f"the free engine did not answer: {text[:300]!r}")


def run(args, workdir: Path) -> tuple[str, dict]:
    data: dict = {"model": Path(args.model).name, "connections": args.wrk_connections,
                  "seconds": args.wrk_seconds, "reply_tokens": args.http_reply_tokens,
                  "threads": args.threads, "cores": os.cpu_count(), "stacks": {}}
    for stack in STACKS:
        log(f"http: the {stack} stack ...")
        data["stacks"][stack] = _stack(args, stack, workdir)
    data["ratios"] = ratios(data)
    return report(data), data


