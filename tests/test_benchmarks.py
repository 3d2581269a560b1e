"""Smoke test of ``python -m benchmarks all`` at tiny sizes: every table has its rows.

Timings are not asserted (the benchmarks measure them); only that the harness runs end
to end on a tiny checkpoint and writes the rows a reader expects.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main

pytestmark = pytest.mark.timeout(360)


def test_quick_harness_writes_every_row(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["all", "--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path / "w"),
                 "--out", str(out), "--questions", "2", "--reply-tokens", "3", "--steps", "3",
                 "--replies", "2", "--concurrency", "1,2", "--poisson-rate", "5",
                 "--requests", "2", "--seconds", "20", "--wrk-seconds", "1",
                 "--wrk-connections", "2", "--profile-seconds", "1",
                 "--hybrid-requests", "4"])
    assert code == 0
    decoding = (out / "decoding.md").read_text(encoding="utf-8")
    server = (out / "server.md").read_text(encoding="utf-8")
    summary = (out / "summary.md").read_text(encoding="utf-8")

    for text in (decoding, server, summary):
        assert "- machine: " in text and "load average at start" in text
        assert "onnxruntime" in text and "TensorFlow" in text
    for backend in ("onnxruntime int8", "onnxruntime fp32", "TensorFlow step loop"):
        assert f"| {backend} | 1 |" in decoding and f"| {backend} | 32 |" in decoding
        assert f"| {backend} | " in decoding.split("### Per reply")[1]
    assert "`python -m benchmarks decoding " in decoding
    assert "| 32 | " in decoding.split("### Engine replies/s")[1]
    for setup in ("on", "off", "two", "baseline"):
        for load in ("1 clients", "2 clients", "Poisson 5/s"):
            assert f"| {setup} | {load} | " in server
        assert f"`python -m benchmarks server --setups {setup} " in server
    for target in ("TensorFlow step loop", "32 clients", "time to first token", "RSS"):
        assert target in summary

    data = json.loads((out / "server.json").read_text(encoding="utf-8"))
    assert set(data["setups"]) == {"on", "off", "two", "baseline"}
    for setup in data["setups"].values():
        assert len(setup["cold_start_s"]) == len(setup["peak_rss_mb"]) >= 1
        assert all(p["replies"] + p["errors"] + p["unfinished"] == p["requests"]
                   for p in setup["points"])
        # Every request of the smoke run gets its forced-length reply.
        assert sum(p["replies"] for p in setup["points"]) == 6
    decoding_data = json.loads((out / "decoding.json").read_text(encoding="utf-8"))
    assert {"replies", "steps", "engine_replies_per_s", "reply_tokens"} <= set(decoding_data)
    around = decoding_data["engine_step_around"]  # the ratio's baseline, beside the engine
    assert around["step_before_ms"] > 0 and around["step_after_ms"] > 0
    rounds = around["rounds"]  # the point ran in rounds; the table shows the median one
    assert len(rounds) == 3 and all(r["replies_per_s"] > 0 for r in rounds)
    assert decoding_data["engine_replies_per_s"]["32"]["batch_32"] in {
        r["replies_per_s"] for r in rounds}
    assert "int8 step around the 32-concurrent batched point" in decoding
    steps = decoding_data["steps"]
    assert steps["onnxruntime int8"]["32"]["flops"] > steps["onnxruntime int8"]["1"]["flops"] > 0
    _check_new_parts(out, capsys)


def _check_new_parts(out, capsys):
    """wrk against the floor, the hybrid mode's cost, the profiles, the targets, the README."""
    http = json.loads((out / "http.json").read_text(encoding="utf-8"))
    assert set(http["stacks"]) == {"uvloop+httptools", "asyncio+h11"}
    for stack_name, stack in http["stacks"].items():
        assert set(stack["points"]) == {
            "floor", "generate, 5 tokens", "generate", "hybrid", "web layer, free engine",
            "generate, 5 tokens, engine process", "generate, engine process",
            "hybrid, engine process"}
        for point in stack["points"].values():  # every contender answered, all 2xx
            assert point["replies_per_s"] > 0 and point["non_2xx"] == 0
            assert point["p99_ms"] >= point["p50_ms"] > 0
            assert point["wrk_cpu_us_per_reply"] > 0  # the load generator's share
            assert point["cpu_us_per_reply"]["event_loop"] > 0  # the floor's too
        assert stack["python_client"]["floor"]["replies"] > 0
        assert stack["cold_start_s"] > 0 and stack["peak_rss_mb"] > 50
        assert len(stack["cold_starts_s"]) == 3  # the median of three launches
        five = stack["points"]["generate, 5 tokens"]  # the server's CPU split, its batch
        assert five["cpu_us_per_reply"]["event_loop"] > 0 and five["rows_per_step"] >= 1
        split = stack["points"]["generate, 5 tokens, engine process"]
        assert split["cpu_us_per_reply"]["engine_process"] > 0  # its CPU is counted
        assert five["cpu_us_per_reply"]["engine_process"] == 0
        assert len(stack["modes"][", engine process"]["peak_rss_parts_mb"]) == 2
        for name in ("generate, 5 tokens", "generate, 5 tokens, engine process"):
            around = stack["points"][name]["floor_around"]  # the floor measured beside it
            assert around["before"] > 0 and around["after"] > 0
        beside = (around["before"] + around["after"]) / 2
        assert http["ratios"][stack_name]["engine_process"][
            "generate_vs_floor"] == pytest.approx(split["replies_per_s"] / beside)
    http_md = (out / "http.md").read_text(encoding="utf-8")
    assert "| uvloop+httptools | floor | " in http_md
    assert "- uvloop+httptools, engine process: 85% of the floor is " in http_md
    assert "| uvloop+httptools | engine process | " in http_md
    hybrid = json.loads((out / "hybrid.json").read_text(encoding="utf-8"))["figures"]
    assert hybrid["hybrid"]["replies_per_s"] > 0 and hybrid["ratio"] > 0
    profile = (out / "profile.md").read_text(encoding="utf-8")
    for section in ("Engine: the step thread", "Engine: the event loop",
                    "Streaming route: the server's event loop"):
        assert f"### {section}" in profile
    assert "onnxruntime" in profile and "us/reply" in profile
    targets = json.loads((out / "summary.json").read_text(encoding="utf-8"))["targets"]
    names = " ".join(t["target"] for t in targets)
    for wanted in ("sse-starlette floor", "batch-32 int8 step", "TensorFlow step loop",
                   "hybrid vs generation-only", "peak RSS", "cold start"):
        assert wanted in names
    assert all(t["command"] and t["measured"] for t in targets)
    capsys.readouterr()
    assert main(["all", "--readme", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| target | wanted | measured | met |" in table and "logical cores" in table


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["server", "--concurrency", "1,x"])
    assert e.value.code == 2
    assert "expected integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["server", "--setups", "on,bogus"])
    assert "setups are on, off, two, baseline" in capsys.readouterr().err


def test_hot_paths_measure_every_path_and_compare_with_an_older_run(tmp_path, capsys):
    from benchmarks import hot_paths

    assert hot_paths.main(["--out", str(tmp_path / "old"), "--tree", "older"]) == 0
    old = json.loads((tmp_path / "old" / "hot_paths.json").read_text(encoding="utf-8"))
    assert len(old["figures"]) == 7 and all(us > 0 for us in old["figures"].values())
    assert hot_paths.main(["--out", str(tmp_path / "new"), "--before",
                           str(tmp_path / "old" / "hot_paths.json")]) == 0
    text = (tmp_path / "new" / "hot_paths.md").read_text(encoding="utf-8")
    assert "| what | before us | now us | now / before |" in text
    assert "--before older/hot_paths.json" in text and str(tmp_path) not in text
    assert "| choose_tokens, batch 32, room sampling" in text
