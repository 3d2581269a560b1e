import json
import math
import subprocess
import sys

import pytest

from serve.runtime.blocklist import Blocklist
from serve.runtime.evaluate import Pair, distinct, evaluate, perplexity, read_pairs
from serve.runtime.model import OnnxSeq2Seq
from tests.conftest import DEMO_CORPUS, ROOT

PAIRS = [Pair(*line.split("\t")) for line in DEMO_CORPUS.read_text("utf-8").splitlines()[:12]]


@pytest.fixture(scope="module")
def model(shipped_model_dir):
    return OnnxSeq2Seq.load(shipped_model_dir)


def test_report_has_every_figure_for_every_mode(model):
    blocklist = Blocklist(terms=["傻逼"], replacements={"小通": "小X"})
    report, replies = evaluate(model, PAIRS, blocklist, seed=3)
    assert report["pairs"] == len(PAIRS)
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
    assert set(report["modes"]) == {"greedy", "beam5", "beam5_antilm", "sampling"}
    for mode, figures in report["modes"].items():
        assert len(replies[mode]) == len(PAIRS)
        for key in ("bleu1", "bleu2", "distinct1", "distinct2", "avg_length",
                    "reply_unk_rate", "top10_share", "blocklist_hits"):
            assert key in figures
        assert 0 <= figures["distinct2"] <= 1
        assert 0 < figures["top10_share"] <= 1
        assert figures["blocklist_hits"] == 0  # suppressed while decoding


def test_perplexity_prefers_the_model_own_replies(model):
    """The model's greedy reply must be likelier to it than an unrelated reference."""
    report, replies = evaluate(model, PAIRS[:4], Blocklist(), seed=0)
    own = [Pair(p.question, r or "。") for p, r in zip(PAIRS[:4], replies["greedy"], strict=True)]
    odd = [Pair(p.question, "量子色动力学的渐近自由") for p in PAIRS[:4]]
    assert perplexity(model, own) < perplexity(model, odd)


def test_distinct_counts_character_ngrams():
    assert distinct(["哈哈哈"], 1) == pytest.approx(1 / 3)
    assert distinct(["你好", "你好"], 2) == pytest.approx(1 / 2)
    assert distinct([""], 2) == 0.0


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("你好\t你好呀\n只有问题\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:2"):
        read_pairs(bad, 0)


def test_cli_prints_the_table_and_writes_json(tmp_path, shipped_model_dir):
    data = tmp_path / "held_out.tsv"
    data.write_text("\n".join(f"{p.question}\t{p.answer}" for p in PAIRS[:6]) + "\n", "utf-8")
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "serve", "evaluate", "--data", str(data), "--model",
         str(shipped_model_dir), "--json", str(out), "--samples", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| greedy |" in result.stdout and "| beam5 |" in result.stdout
    assert json.loads(out.read_text())["pairs"] == 6


def test_cli_missing_file_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "serve", "evaluate", "--data", str(tmp_path / "nope.tsv")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_prompts_without_references_get_replies_a_sheet_and_the_reranked_modes(model_dir,
                                                                               tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好呀\n今天好冷\n\n中午吃啥\n", encoding="utf-8")
    sheet = tmp_path / "sheet.tsv"
    out = subprocess.run(
        [sys.executable, "-m", "serve", "evaluate", "--model", str(model_dir), "--prompts",
         str(prompts), "--modes", "greedy,hybrid", "--sheet", str(sheet),
         "--json", str(tmp_path / "report.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["perplexity"] is None and set(report["modes"]) == {"greedy", "hybrid"}
    assert report["modes"]["hybrid"]["bleu2"] is None
    assert 0 < report["modes"]["hybrid"]["retrieved_share"] <= 1
    rows = [line.split("\t") for line in sheet.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["prompt", "mode", "reply", "sensible", "specific"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        (p, m) for p in ("你好呀", "今天好冷", "中午吃啥") for m in ("greedy", "hybrid")]
    unknown = subprocess.run(
        [sys.executable, "-m", "serve", "evaluate", "--model", str(model_dir), "--prompts",
         str(prompts), "--modes", "nonsense"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert unknown.returncode == 2 and "no mode nonsense" in unknown.stderr


def test_ssa_from_a_rated_sheet(tmp_path):
    from serve.runtime.evaluate import ssa_table

    sheet = tmp_path / "rated.tsv"
    sheet.write_text("prompt\tmode\treply\tsensible\tspecific\n"
                     "你好\thybrid\t你好呀\t1\t1\n今天好冷\thybrid\t我也是\t1\t0\n"
                     "中午吃啥\thybrid\t我是鸡\t0\t1\n你好\tgreedy\t我是\t0\t0\n", encoding="utf-8")
    table = ssa_table(sheet)
    # hybrid: sensible 2/3, specific 1/3 (a nonsensical reply is never specific): SSA 50%.
    assert "| hybrid | 3 | 67% | 33% | 50% |" in table
    assert "| greedy | 1 | 0% | 0% | 0% |" in table
    sheet.write_text("prompt\tmode\treply\tsensible\tspecific\n你好\thybrid\t你好\t\t\n",
                     encoding="utf-8")
    with pytest.raises(ValueError, match="rated.tsv:2"):
        ssa_table(sheet)
