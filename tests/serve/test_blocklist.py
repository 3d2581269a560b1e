import pytest

from serve.blocklist import Blocklist, BlocklistError
from tests.conftest import ROOT


def test_project_blocklist_parses_terms_and_renames():
    blocklist = Blocklist.load(ROOT / "data" / "blocklist.txt")
    assert blocklist.replacements["小黄鸡"] == "小X"
    assert "小通" in blocklist.words and "小黄鸡" in blocklist.words
    assert blocklist.terms


def test_matching_is_on_normalised_lowercase_text(tmp_path):
    path = tmp_path / "blocklist.txt"
    path.write_text("# comment\nSB\n小黃雞 -> 小X\n", encoding="utf-8")
    blocklist = Blocklist.load(path)
    assert blocklist.blocks("你是sb吗")
    assert blocklist.replace("我是小黄鸡") == "我是小X"
    assert blocklist.hits("我是小黃雞") == ["小黄鸡"]


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(BlocklistError, match="not found"):
        Blocklist.load(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n -> 小X\n", encoding="utf-8")
    with pytest.raises(BlocklistError, match=r"bad.txt:2"):
        Blocklist.load(bad)
