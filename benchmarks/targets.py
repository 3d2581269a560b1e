"""The targets against the figures of one run (``summary.md``/``.json``), and the README's
speed table made from them (``python -m benchmarks all --readme``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import machine_lines, write_results
from benchmarks.wrk_report import ENGINE_PROCESS, ONE_PROCESS, floor_beside

INT8, TF = "onnxruntime int8", "TensorFlow step loop"
STANDARD = "uvloop+httptools"


def _decoding(d: dict) -> list[tuple]:
    greedy = d["replies"][TF]["greedy"]["p50_ms"] / d["replies"][INT8]["greedy"]["p50_ms"]
    engine = d["engine_replies_per_s"]["32"]
    around = d.get("engine_step_around")  # the step timed beside the engine, if it was
    step_ms = ((around["step_before_ms"] + around["step_after_ms"]) / 2 if around
               else d["steps"][INT8]["32"]["p50_ms"])
    step_rate = 32 / (step_ms / 1000)
    engine_rate = engine["batch_32"] * d["reply_tokens"]
    return [
        ("int8 greedy per-reply latency vs the TensorFlow step loop", ">= 10x faster",
         greedy, f"{greedy:.1f}x", greedy >= 10, d["command"]),
        ("engine reply tokens/s at 32 concurrent vs the batch-32 int8 step's token rate",
         ">= 60%", engine_rate / step_rate,
         f"{100 * engine_rate / step_rate:.0f}% ({engine_rate:,.0f} of {step_rate:,.0f})",
         engine_rate / step_rate >= 0.6, d["command"]),
        ("continuous batching vs one at a time, in-process engine, 32 concurrent", ">= 5x",
         engine["batch_32"] / engine["batch_1"],
         f"{engine['batch_32'] / engine['batch_1']:.1f}x",
         engine["batch_32"] / engine["batch_1"] >= 5, d["command"]),
    ]


def _http(h: dict) -> list[tuple]:
    s = h["stacks"][STANDARD]
    rows = []
    # the server as it runs by default (its engine in a process of its own), then in one
    for mode, label in ((ENGINE_PROCESS, ""), (ONE_PROCESS, " (XIAOX_ENGINE_PROCESS=0)")):
        rows += _http_mode(h, mode, label)
    five = f"generate, {h['reply_tokens']} tokens"
    web = h["ratios"][STANDARD].get("web_layer_vs_floor")
    if web:  # what the web layer costs without the model's work
        free = s["points"]["web layer, free engine"]
        rows.append(("xiaoX's web layer alone (a free engine) vs the floor, replies/s (wrk)",
                     "(ratio)", web, f"{100 * web:.0f}% ({free['replies_per_s']:.0f} of "
                     f"{s['points']['floor']['replies_per_s']:.0f})", None, free["command"]))
    gain = h["ratios"].get("standard_vs_fallback", {}).get(five)
    if gain:
        rows.append(("uvloop + httptools vs asyncio + h11, generation-only replies/s",
                     "(ratio)", gain, f"{gain:.2f}x", None, s["points"][five]["command"]))
    return rows


def _http_mode(h: dict, mode: str, label: str) -> list[tuple]:
    """The HTTP targets of one engine mode (``label`` names the setting that picks it)."""
    s, p = h["stacks"][STANDARD], h["stacks"][STANDARD]["points"]
    r = h["ratios"][STANDARD]
    r = r if mode == ONE_PROCESS else r["engine_process"]
    m = s["modes"][mode] if "modes" in s else s  # a run before the engine process
    five, c = f"generate, {h['reply_tokens']} tokens", h["connections"]
    hybrid = p["hybrid" + mode]["command"]
    return [
        (f"generation-only streamed replies/s at {c} connections vs the bare "
         f"sse-starlette floor (wrk){label}", ">= 85%", r["generate_vs_floor"],
         f"{100 * r['generate_vs_floor']:.0f}% ({p[five + mode]['replies_per_s']:.0f} of "
         f"{floor_beside(p, five + mode):.0f})", r["generate_vs_floor"] >= 0.85,
         p[five + mode]["command"]),
        (f"hybrid vs generation-only replies/s at {c} connections (wrk){label}",
         ">= 40%, p99 < 300 ms", r["hybrid_vs_generate"],
         f"{100 * r['hybrid_vs_generate']:.0f}%, p99 {r['hybrid_p99_ms']:.0f} ms",
         r["hybrid_vs_generate"] >= 0.4 and (r["hybrid_p99_ms"] or 1e9) < 300, hybrid),
        _memory_row(m, mode, label, hybrid),
        (f"the same: cold start (launch to /healthz 200, median of 3){label}", "< 2 s",
         m["cold_start_s"], f"{m['cold_start_s']:.2f} s", m["cold_start_s"] < 2, hybrid),
    ]


def _memory_row(m: dict, mode: str, label: str, command: str) -> tuple:
    """One process: its peak RSS. Two: what they hold together (the sum of their PSS
    after the load; the sum of their peak RSS counts the pages they share twice)."""
    if mode == ONE_PROCESS or "pss_mb" not in m:
        return (f"one server process with the hybrid index: peak RSS{label}", "< 250 MB",
                m["peak_rss_mb"], f"{m['peak_rss_mb']:.0f} MB",
                (m["peak_rss_mb"] or 1e9) < 250, command)
    peaks = " + ".join(f"{x:.0f}" for x in m["peak_rss_parts_mb"])
    return (f"the server with the hybrid index: its processes' PSS together after the "
            f"load{label}", "< 250 MB", m["pss_mb"],
            f"{m['pss_mb']:.0f} MB (peak RSS {peaks} MB)", m["pss_mb"] < 250, command)


def _hybrid(y: dict) -> list[tuple]:
    f = y["figures"]
    return [("hybrid vs generation-only replies/s, in-process engine, 32 concurrent",
             ">= 40%", f["ratio"], f"{100 * f['ratio']:.0f}%", f["ratio"] >= 0.4, y["command"])]


def _server(s: dict) -> list[tuple]:
    """The Python client's targets at 32 clients ("-" when the run had no such point)."""
    from benchmarks.server_load import _point

    on, off, base = (_point(s, name, 32) for name in ("on", "off", "baseline"))
    batching = on["replies_per_s"] / off["replies_per_s"] if on and off and \
        off["replies_per_s"] else None
    ttft = on["ttft_p99_ms"] if on else None
    ours = on["replies_per_s"] / base["replies_per_s"] if on and base and \
        base["replies_per_s"] else None
    command = on["command"] if on else s["command"]

    def shown(value, text):
        return "-" if value is None else text

    return [
        ("continuous batching vs one at a time, replies/s at 32 clients (HTTP)", ">= 5x",
         batching, shown(batching, f"{batching or 0:.1f}x"),
         None if batching is None else batching >= 5, command),
        ("p99 time to first token at 32 clients (batching on)", "< 100 ms", ttft,
         shown(ttft, f"{ttft or 0:.0f} ms"), None if ttft is None else ttft < 100, command),
        ("ours vs the TensorFlow baseline, replies/s at 32 clients", "(ratio)", ours,
         shown(ours, f"{ours or 0:.1f}x"), None, base["command"] if base else command),
    ]


SOURCES: dict[str, Callable[[dict], list[tuple]]] = {
    "decoding": _decoding, "http": _http, "hybrid": _hybrid, "server": _server}


def rows_of(found: dict) -> list[dict]:
    rows = []
    for name, make in SOURCES.items():
        if name in found:
            for target, wanted, value, shown, met, command in make(found[name]):
                rows.append({"target": target, "wanted": wanted, "value": value,
                             "measured": shown, "met": met, "command": command})
    return rows


def table(rows: list[dict], commands: bool = True) -> str:
    head = "| target | wanted | measured | met |" + (" command |" if commands else "")
    lines = [head, "| --- | --- | ---: | :---: |" + (" --- |" if commands else "")]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        line = f"| {r['target']} | {r['wanted']} | {r['measured']} | {met} |"
        lines.append(line + (f" `{r['command']}` |" if commands else ""))
    return "\n".join(lines)


def write_summary(args, info: dict, found: dict, command: str, seconds: float) -> None:
    rows = rows_of(found)
    text = "\n".join(["# xiaoX benchmarks: the targets", "", *machine_lines(info),
                      f"- run: `{command}` ({args.profile} profile), {seconds:.0f} s in all",
                      "", "Ratios within this one run (measured, not asserted).", "",
                      table(rows), "", "Details: " + ", ".join(f"{n}.md" for n in found)])
    write_results(args.out, "summary", text, {"machine": info, "command": command,
                                              "seconds": seconds, "targets": rows})


def readme_table(out_dir: Path) -> str:
    """The README's speed table from ``summary.json`` (what the last ``all`` measured)."""
    data = json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))
    m = data["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    return "\n".join([
        f"Measured by `{data['command']}` ({data['seconds']:.0f} s) on {m['cpu']}, "
        f"{m['cores']} logical cores (load average {load} at the start); ratios within "
        "that one run. Commands per figure: [benchmarks/results/summary.md]"
        "(benchmarks/results/summary.md).", "", table(data["targets"], commands=False)])


BEGIN, END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"


def update_readme(out_dir: Path, readme: Path) -> None:
    """Put ``readme_table(out_dir)`` between the README's speed-table markers."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + readme_table(out_dir) + "\n" + END
                      + rest.split(END, 1)[1], encoding="utf-8")
