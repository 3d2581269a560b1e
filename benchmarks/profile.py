"""Where the time goes: cProfile of the engine and of the streaming route.

    python -m benchmarks profile [--model DIR] [--profile-seconds 5]

- engine: the in-process engine at 32 concurrent requests (the folder's generation
  settings: sampling), both of its threads: the event loop (delivery, the consumers) and
  the worker that runs each batched step (decoder, rules, choice);
- route: one ``python -m serve`` process run under ``python -m cProfile`` while ``wrk``
  streams ``POST /v1/chat/completions`` (generation only) at 32 connections; its event
  loop thread (HTTP, routing, serialisation, SSE framing, delivery).

Each profile is summarised by area (which code the time is spent in, by file) and by its
top functions (own time). ``profile_before.json`` in the results folder, when present, is
the same profile of an earlier commit, shown beside.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import ROOT, log, shown
from benchmarks.processes import ServerProcess

AREAS = (  # (area, a piece of the file's path), first match wins
    ("onnxruntime (the model)", "onnxruntime"), ("xiaoX web", "serve/web"),
    ("xiaoX runtime", "serve/runtime"), ("sse-starlette", "sse_starlette"),
    ("starlette", "starlette"), ("uvicorn", "uvicorn"), ("httptools/h11", "httptools"),
    ("httptools/h11", "h11"), ("asyncio", "asyncio"), ("json", "json"),
    ("numpy", "numpy"), ("jieba", "jieba"),
)
TOP = 12


def _area(filename: str, name: str) -> str:
    if filename == "~":  # a builtin: by its name
        if "onnxruntime" in name:
            return AREAS[0][0]
        if "poll" in name or "select" in name:
            return "waiting (epoll)"
        if "acquire" in name:
            return "waiting (locks)"
        return "builtins (C)"
    for area, part in AREAS:
        if part in filename:
            return area
    return "other Python"


def _short(filename: str) -> str:
    """A file as the tables show it: no machine paths (the repository's, site-packages',
    the standard library's prefix dropped)."""
    for marker in ("site-packages/", f"{ROOT}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return re.sub(r"^.*/lib/python3\.\d+/", "", filename)


def summarise(stats: pstats.Stats, top: int = TOP, replies: int | None = None) -> dict:
    """Own time by area and the top functions, as shares of the profile's total (and in
    microseconds per reply when ``replies`` is given)."""
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1e-9
    areas: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in entries.items():
        area = _area(filename, name)
        areas[area] = areas.get(area, 0.0) + own
        short = _short(filename)
        rows.append({"function": f"{short}:{line}({name})", "calls": calls, "own_s": own,
                     "cumulative_s": cumulative, "area": area})
    rows.sort(key=lambda r: -r["own_s"])
    per = 1e6 / replies if replies else None
    return {"total_s": total, "replies": replies,
            "areas": {a: s / total for a, s in sorted(areas.items(), key=lambda x: -x[1])},
            "area_us_per_reply": {a: s * per for a, s in areas.items()} if per else None,
            "top": [{**r, "share": r["own_s"] / total,
                     "us_per_reply": r["own_s"] * per if per else None} for r in rows[:top]]}


async def _engine_load(model_dir: Path, seconds: float, threads: int):
    from serve.runtime.engine import Engine
    from serve.runtime.model import OnnxSeq2Seq
    from serve.runtime.options import DEFAULT_GENERATION, DecodingOptions

    model = OnnxSeq2Seq.load(model_dir, intra_op_num_threads=threads)
    engine = Engine(model, max_batch_size=32, max_queue=1024)
    options = replace(DecodingOptions(**(model.manifest.generation or DEFAULT_GENERATION)),
                      reply_mode="generate", generated_candidates=1)
    worker = cProfile.Profile()
    step = engine._batch.step  # profiled in its own thread

    def profiled_step(newcomers, rows):
        worker.enable()
        try:
            return step(newcomers, rows)
        finally:
            worker.disable()

    engine._batch.step = profiled_step  # type: ignore[method-assign]
    await engine.start()
    replies, deadline = 0, time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal replies
        while time.perf_counter() < deadline:
            async for _ in engine.stream("你好，今天过得怎么样", replace(options, seed=i)):
                pass
            replies += 1
            i += 32

    loop_profile = cProfile.Profile()
    loop_profile.enable()
    await asyncio.gather(*(client(i) for i in range(32)))
    loop_profile.disable()
    await engine.stop()
    return loop_profile, worker, replies / seconds


def profile_engine(model_dir: Path, seconds: float, threads: int) -> dict:
    loop_profile, worker, rate = asyncio.run(_engine_load(model_dir, seconds, threads))
    replies = round(rate * seconds)
    return {"replies_per_s": rate, "replies": replies,
            "event_loop": summarise(pstats.Stats(loop_profile), replies=replies),
            "step_thread": summarise(pstats.Stats(worker), replies=replies)}


class ProfiledServer(ServerProcess):
    """``python -m cProfile -o FILE -m serve ...``: the stats are written when it exits."""

    def __init__(self, *args, out: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def command(self) -> list[str]:
        serve = super().command()
        return [serve[0], "-m", "cProfile", "-o", str(self.out), *serve[1:]]

    def stop(self, timeout: float = 30.0) -> None:
        # SIGINT, not SIGTERM: uvicorn re-raises the signal it caught once it has shut
        # down, and only KeyboardInterrupt still lets cProfile write its stats.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        super().stop(timeout)


def profile_route(model_dir: Path, seconds: float, threads: int, workdir: Path) -> dict:
    from benchmarks.wrk_load import STACKS, bodies, run_wrk, stack_env

    out = workdir / "route.prof"
    # asyncio + h11: their loop is Python, so cProfile sees the waiting in epoll as such
    # (under uvloop it lands on whatever Python frame ran last).
    server = ProfiledServer(model_dir, workdir, out=out,
                            env={"XIAOX_THREADS": str(threads), "XIAOX_MAX_QUEUE": "1024",
                                 # one process, as profile_before.json was
                                 "XIAOX_ENGINE_PROCESS": "0", **stack_env(STACKS[1], workdir)})
    body = bodies(5)["generate, 5 tokens"]
    server.launch().wait_healthy(120)
    try:
        run_wrk(server.url, body, 32, 1)
        figures = run_wrk(server.url, body, 32, seconds)
    finally:
        server.stop()
    if not out.is_file():
        raise RuntimeError(f"the profiled server wrote no stats:\n{server.log_tail()}")
    replies = figures["requests"]
    return {"replies_per_s": figures["replies_per_s"], "replies": replies,
            "event_loop": summarise(pstats.Stats(str(out)), replies=replies)}


def run(args, workdir: Path) -> tuple[str, dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"profile: the engine, {args.profile_seconds:g} s ...")
    engine = profile_engine(args.model, args.profile_seconds, args.threads)
    log(f"profile: the streaming route under wrk, {args.profile_seconds:g} s ...")
    route = profile_route(args.model, args.profile_seconds, args.threads, workdir)
    data = {"model": Path(args.model).name, "seconds": args.profile_seconds,
            "command": f"python -m benchmarks profile --model {shown(args.model)} "
                       f"--profile-seconds {args.profile_seconds:g}",
            "engine": engine, "route": route}
    before_file = Path(args.out) / "profile_before.json"
    before = json.loads(before_file.read_text()) if before_file.is_file() else None
    return report(data, before), data


def _us(entry: dict, key: str, area: str | None = None) -> str:
    if area is not None:
        value = (entry.get("area_us_per_reply") or {}).get(area)
    else:
        value = entry.get(key)
    return "-" if value is None else f"{value:.0f}"


def _section(title: str, now: dict, before: dict | None) -> list[str]:
    head = "| area | own time now | us/reply now |" + (" before | us/reply before |"
                                                      if before else "")
    lines = [f"### {title}", "", head, "| --- | ---: | ---: |" + (" ---: | ---: |"
                                                               if before else "")]
    for area, share in now["areas"].items():
        old = (f" {100 * before['areas'].get(area, 0):.0f}% | {_us(before, '', area)} |"
               if before else "")
        lines.append(f"| {area} | {100 * share:.0f}% | {_us(now, '', area)} |{old}")
    for label, entry in (("now", now), ("before", before)):
        if entry is None:
            continue
        lines += ["", f"| top functions {label} (own time) | calls | share | us/reply |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{r['function']}` | {r['calls']} | {100 * r['share']:.1f}% | "
                  f"{_us(r, 'us_per_reply')} |" for r in entry["top"]]
    return lines + [""]


def report(data: dict, before: dict | None) -> str:
    e, r = data["engine"], data["route"]
    eb = before["engine"] if before else None
    rb = before["route"] if before else None
    then = (lambda d, k: f" (before: {d[k]['replies_per_s']:.0f})") if before else \
        (lambda d, k: "")
    lines = ["## Profiles (cProfile)", "", f"`{data['command']}`; model `{data['model']}`"
             + (f"; before = {before.get('commit', 'an earlier commit')}" if before else ""),
             "", f"- engine, 32 concurrent, in-process: {e['replies_per_s']:.0f} replies/s"
             + then(before, "engine"),
             f"- route under wrk (profiled, so slower than unprofiled): "
             f"{r['replies_per_s']:.0f} replies/s" + then(before, "route"), ""]
    lines += _section("Engine: the step thread", e["step_thread"], eb and eb["step_thread"])
    lines += _section("Engine: the event loop", e["event_loop"], eb and eb["event_loop"])
    lines += _section("Streaming route: the server's event loop", r["event_loop"],
                      rb and rb["event_loop"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run it as: python -m benchmarks profile")
