"""Smoke test of ``python -m benchmarks all`` at tiny sizes: every table has its rows.

Timings are not asserted (the benchmarks measure them); only that the harness runs end
to end on a tiny checkpoint and writes the rows a reader expects.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main

pytestmark = pytest.mark.timeout(240)


def test_quick_harness_writes_every_row(tiny_checkpoint, tmp_path):
    out = tmp_path / "results"
    code = main(["all", "--checkpoint", str(tiny_checkpoint), "--workdir", str(tmp_path / "w"),
                 "--out", str(out), "--questions", "2", "--reply-tokens", "3", "--steps", "3",
                 "--replies", "2", "--concurrency", "1,2", "--poisson-rate", "5",
                 "--requests", "2", "--seconds", "20"])
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
    steps = json.loads((out / "decoding.json").read_text(encoding="utf-8"))["steps"]
    assert steps["onnxruntime int8"]["32"]["flops"] > steps["onnxruntime int8"]["1"]["flops"] > 0


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["server", "--concurrency", "1,x"])
    assert e.value.code == 2
    assert "expected integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["server", "--setups", "on,bogus"])
    assert "setups are on, off, two, baseline" in capsys.readouterr().err
