"""The HTTP benchmark's ratios and its markdown (``benchmarks.wrk_load`` measures)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import fmt

STACKS = ("uvloop+httptools", "asyncio+h11")
FREE = "web layer, free engine"
# The engine's place: in the server's process, or in one of its own (a contender's name
# is the body's, then the mode's suffix).
ONE_PROCESS, ENGINE_PROCESS = "", ", engine process"
MODE_NAMES = {ONE_PROCESS: "one process", ENGINE_PROCESS: "engine process"}


def floor_beside(points: dict, name: str) -> float:
    """The floor's replies/s measured beside the point ``name`` (the mean of the points
    just before and after it), else the floor's own point."""
    around = points[name].get("floor_around")
    if around:
        return (around["before"] + around["after"]) / 2
    return points["floor"]["replies_per_s"]


def mode_ratios(points: dict, five: str, mode: str) -> dict:
    """One engine mode's target ratios within a stack (generation only against the
    floor measured beside it)."""
    floor = floor_beside(points, five + mode)
    return {"generate_vs_floor": points[five + mode]["replies_per_s"] / floor,
            "hybrid_vs_generate": points["hybrid" + mode]["replies_per_s"]
            / points["generate" + mode]["replies_per_s"],
            "hybrid_p99_ms": points["hybrid" + mode]["p99_ms"]}


def ratios(data: dict) -> dict:
    """The targets' ratios within each stack: the server with its engine in its own
    process under ``engine_process``, with the web layer's on its own."""
    found = {}
    five = f"generate, {data['reply_tokens']} tokens"
    for stack, entry in data["stacks"].items():
        p = entry["points"]
        found[stack] = {**mode_ratios(p, five, ONE_PROCESS),
                        "web_layer_vs_floor": p[FREE]["replies_per_s"]
                        / p["floor"]["replies_per_s"],
                        "engine_process": mode_ratios(p, five, ENGINE_PROCESS)}
    a, b = (data["stacks"].get(s) for s in STACKS)
    if a and b:
        found["standard_vs_fallback"] = {
            name: a["points"][name]["replies_per_s"] / b["points"][name]["replies_per_s"]
            for name in a["points"]}
    return found


def reply_cpu_us(point: dict) -> float | None:
    """The server's (both processes') and wrk's CPU per reply of a point, together."""
    if "cpu_us_per_reply" not in point or "wrk_cpu_us_per_reply" not in point:
        return None
    return sum(point["cpu_us_per_reply"].values()) + point["wrk_cpu_us_per_reply"]


def _cores_busy(point: dict) -> float | None:
    used = reply_cpu_us(point)
    return None if used is None else used * point["replies_per_s"] / 1e6


def _budget_lines(data: dict) -> list[str]:
    """What the generation-only target would cost this machine: xiaoX's and wrk's CPU per
    reply, measured, at 85% of the floor's rate."""
    five = f"generate, {data['reply_tokens']} tokens"
    lines = []
    for stack, entry in data["stacks"].items():
        for mode, mode_name in MODE_NAMES.items():
            used = reply_cpu_us(entry["points"].get(five + mode, {}))
            if used is None or "floor" not in entry["points"]:
                continue
            floor = floor_beside(entry["points"], five + mode)
            wanted = 0.85 * floor
            around = entry["points"][five + mode].get("floor_around")
            if around:
                lines.append(f"- {stack}, {mode_name}: the floor beside `{five}`: "
                             f"{around['before']:.0f} replies/s just before, "
                             f"{around['after']:.0f} just after (mean {floor:.0f})")
            lines.append(f"- {stack}, {mode_name}: 85% of the floor is {wanted:.0f} "
                         f"replies/s; at the CPU per reply measured here (xiaoX and wrk, "
                         f"{used:.0f} us) that needs {used * wanted / 1e6:.2f} cores; the "
                         f"machine has {data.get('cores', '?')}")
    return ["", *lines] if lines else []


def _header(data: dict) -> list[str]:
    five = f"generate, {data['reply_tokens']} tokens"
    return [
        "## HTTP with wrk: xiaoX against its framework's floor", "",
        f"- model folder `{Path(data['model']).name}`; `wrk -t1 -c{data['connections']} "
        f"-d{data['seconds']:g}s --latency -s benchmarks/floor/stream.lua` (a streaming "
        "POST /v1/chat/completions) on 127.0.0.1; latency = the whole streamed reply",
        "- floor: `benchmarks/floor/sse_floor.py`, a bare sse-starlette endpoint streaming "
        "five fixed pieces on the same Starlette, sse-starlette and uvicorn",
        f"- `{five}`: generation only, every reply forced to {data['reply_tokens']} tokens; "
        "`generate`/`hybrid`: the folder's generation settings; `..., engine process`: the "
        "same against a server with `XIAOX_ENGINE_PROCESS=1` (its engine in a process of "
        "its own)",
        f"- `{FREE}`: the `{five}` body against xiaoX's own server with "
        "`benchmarks/floor/free_engine.py` for its engine (the floor's five pieces, one "
        "per millisecond step, no model): what xiaoX's web layer costs on its own",
        f"- {data['threads']} onnxruntime thread(s); wrk and the server share the machine",
        f"- the floor's server runs throughout: each `{five}` point is measured between "
        "two floor points, whose mean is its ratio's baseline (this machine's speed drifts "
        "by a third within minutes); the floor's own row is its last point",
        "",
        "| stack | contender | replies/s | p50 ms | p90 ms | p99 ms | non-2xx | socket "
        "errors | command |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]


def _python_client_lines(data: dict) -> list[str]:
    lines = ["", "The same with the Python client (httpx, `benchmarks.server_load`), "
             f"{data['connections']} clients:", "",
             "| stack | contender | replies | errors | replies/s | TTFT p50 ms | "
             "e2e p50 ms | e2e p99 ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for stack, entry in data["stacks"].items():
        for name, p in entry["python_client"].items():
            lines.append(f"| {stack} | {name} | {p['replies']} | {p['errors']} | "
                         f"{p['replies_per_s']:.1f} | {fmt(p['ttft_p50_ms'])} | "
                         f"{fmt(p['e2e_p50_ms'])} | {fmt(p['e2e_p99_ms'])} |")
    return lines


def _mode_lines(data: dict) -> list[str]:
    five = f"generate, {data['reply_tokens']} tokens"
    lines = ["", "| stack | engine | cold start s (hybrid index; median of 3 launches) | "
             "peak RSS MB (each process) | PSS MB after the load (each process) | "
             f"{five} / floor | {FREE} / floor | hybrid / generate | hybrid p99 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stack, entry in data["stacks"].items():
        r = data["ratios"][stack]
        for mode, name in MODE_NAMES.items():
            m, mr = entry["modes"][mode], (r if mode == ONE_PROCESS else r["engine_process"])
            launches = " / ".join(f"{x:.2f}" for x in m["cold_starts_s"])
            parts = " + ".join(fmt(x, 0) for x in m["peak_rss_parts_mb"])
            shared = " + ".join(fmt(x, 0) for x in m["pss_parts_mb"])
            lines.append(f"| {stack} | {name} | {m['cold_start_s']:.2f} ({launches}) | "
                         f"{fmt(m['peak_rss_mb'], 0)} ({parts}) | "
                         f"{fmt(m['pss_mb'], 0)} ({shared}) | "
                         f"{mr['generate_vs_floor']:.2f} | {r['web_layer_vs_floor']:.2f} | "
                         f"{mr['hybrid_vs_generate']:.2f} | {fmt(mr['hybrid_p99_ms'])} |")
    return lines


def _cpu_lines(data: dict) -> list[str]:
    lines = ["", "Where the CPU went per reply (the server's threads and its engine process "
             "read from /proc before and after each point, wrk's from its rusage), the "
             "cores that kept busy, and the rows of xiaoX's decoder steps:", "",
             "| stack | contender | event loop us/reply | other threads us/reply | engine "
             "process us/reply | wrk us/reply | cores busy | rows per decoder step |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stack, entry in data["stacks"].items():
        for name, p in entry["points"].items():
            cpu = p.get("cpu_us_per_reply")
            if cpu:
                lines.append(f"| {stack} | {name} | {cpu['event_loop']:.0f} | "
                             f"{cpu['other_threads']:.0f} | "
                             f"{cpu.get('engine_process', 0.0):.0f} | "
                             f"{fmt(p.get('wrk_cpu_us_per_reply'), 0)} | "
                             f"{fmt(_cores_busy(p), 2)} | {fmt(p['rows_per_step'])} |")
    return lines


def report(data: dict) -> str:
    lines = _header(data)
    for stack, entry in data["stacks"].items():
        for name, p in entry["points"].items():
            lines.append(f"| {stack} | {name} | {p['replies_per_s']:.1f} | {fmt(p['p50_ms'])} "
                         f"| {fmt(p['p90_ms'])} | {fmt(p['p99_ms'])} | {p['non_2xx']} | "
                         f"{p['socket_errors']} | `{p['command']}` |")
    lines += _python_client_lines(data) + _mode_lines(data) + _cpu_lines(data)
    lines += _budget_lines(data)
    if "standard_vs_fallback" in data["ratios"]:
        pairs = ", ".join(f"{k} {v:.2f}x" for k, v in
                          data["ratios"]["standard_vs_fallback"].items())
        lines += ["", f"uvloop + httptools vs asyncio + h11 (replies/s): {pairs}"]
    return "\n".join(lines)
