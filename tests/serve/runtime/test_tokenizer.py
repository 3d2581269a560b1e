import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.runtime.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    TokenizerSettings,
    Vocab,
    detokenize,
    normalize,
)

SAMPLE = ["你好", "今天天气怎么样", "我喜欢听 Taylor Swift 的歌", "iPhone 15 好用吗", "哈哈😀"]


def full_vocab_tokenizer(texts, **settings) -> Tokenizer:
    """A tokenizer whose vocabulary holds every word of ``texts``: nothing is unknown."""
    plain = Tokenizer(Vocab(list(SPECIAL_TOKENS)), TokenizerSettings(**settings))
    vocab = Vocab.build((plain.segment(t) for t in texts), min_freq=1, max_size=10**6)
    return Tokenizer(vocab, TokenizerSettings(**settings))


def real_lines(shared_data, limit=300):
    lines = []
    for line in (shared_data / "XHJ_5w.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("M "):
            lines.append(line[2:])
        if len(lines) >= limit:
            break
    dialogues = json.loads((shared_data / "LCCC-base_valid.json").read_text(encoding="utf-8"))
    lines += [utterance for dialogue in dialogues[:100] for utterance in dialogue]
    with open(shared_data / "CDial-toy_train.txt", encoding="utf-8") as f:
        for _, line in zip(range(100), f, strict=False):
            lines.extend(line.rstrip("\n").split("\t"))
    return lines


@pytest.mark.shared_data
@pytest.mark.parametrize("segmenter", ["jieba", "char"])
def test_round_trip_on_real_corpus_lines(shared_data, segmenter):
    lines = real_lines(shared_data)
    tokenizer = full_vocab_tokenizer(lines, segmenter=segmenter)
    assert len(lines) > 500
    for line in lines:
        assert tokenizer.decode(tokenizer.encode(line)) == normalize(line)


@pytest.mark.shared_data
def test_lccc_spaced_characters_become_plain_text(shared_data):
    dialogues = json.loads((shared_data / "LCCC-base_valid.json").read_text(encoding="utf-8"))
    spaced = dialogues[0][0]
    assert " " in spaced
    assert normalize(spaced) == spaced.replace(" ", "") or any(
        a.isascii() and b.isascii() for a, b in zip(spaced, spaced[2:], strict=False)
    )


def test_traditional_input_is_simplified():
    assert normalize("這隻是一個不成功的嘗試") == "这只是一个不成功的尝试"
    tokenizer = full_vocab_tokenizer(["这只是一个不成功的尝试"])
    assert UNK_ID not in tokenizer.encode("這隻是一個不成功的嘗試")


def test_unknown_words_become_unk_instead_of_disappearing():
    tokenizer = full_vocab_tokenizer(["你好"], char_fallback=False)
    ids = tokenizer.encode("你好 外星人")
    assert ids[0] == tokenizer.vocab.id("你好")
    assert ids[-1] == UNK_ID
    assert len(ids) == 2


def test_char_fallback_spells_unknown_words_from_known_characters():
    tokenizer = full_vocab_tokenizer(["天气", "好人"])  # 天 气 好 人 are known as characters
    assert "天气好" not in tokenizer.vocab
    ids = tokenizer.encode("天气好")
    assert UNK_ID not in ids
    assert tokenizer.decode(ids) == "天气好"
    assert tokenizer.encode("龘") == [UNK_ID]


def test_emoji_survive_including_zwj_sequences():
    family = "👨\u200d👩\u200d👧"
    tokenizer = full_vocab_tokenizer(["哈哈😀", f"一家人{family}"])
    assert tokenizer.decode(tokenizer.encode("哈哈😀")) == "哈哈😀"
    assert tokenizer.decode(tokenizer.encode(f"一家人{family}")) == f"一家人{family}"


def test_latin_words_keep_single_spaces_and_cjk_joins_without():
    assert normalize("我  喜欢   Taylor   Swift") == "我喜欢Taylor Swift"
    tokenizer = full_vocab_tokenizer(SAMPLE)
    assert tokenizer.decode(tokenizer.encode("我喜欢听 Taylor Swift 的歌")) == (
        "我喜欢听Taylor Swift的歌"
    )
    assert detokenize(["hello", "world", "你", "好"]) == "hello world你好"


def test_full_width_letters_and_digits_become_half_width():
    assert normalize("ｉＰｈｏｎｅ　１５") == "iPhone 15"
    assert normalize("你好，世界！") == "你好，世界！"  # Chinese punctuation stays


def test_control_and_direction_characters_are_removed():
    assert normalize("你\x00好\u202e啊\x1b") == "你好啊"


@pytest.mark.parametrize("text", ["", " ", "\t\n ", "\u3000\u3000"])
def test_empty_and_whitespace_only(text):
    tokenizer = full_vocab_tokenizer(SAMPLE)
    assert normalize(text) == ""
    assert tokenizer.encode(text) == []
    assert tokenizer.encode(text, add_eos=True) == [EOS_ID]
    assert tokenizer.decode([]) == ""


def test_decode_skips_specials_and_stops_at_eos():
    tokenizer = full_vocab_tokenizer(SAMPLE)
    hello = tokenizer.vocab.id("你好")
    assert tokenizer.decode([BOS_ID, hello, PAD_ID, EOS_ID, hello]) == "你好"


def test_vocab_min_freq_max_size_and_file_round_trip(tmp_path):
    vocab = Vocab.build([["a", "b"], ["a", "c"], ["a", "b"]], min_freq=2, max_size=100)
    assert vocab.tokens == [*SPECIAL_TOKENS, "a", "b"]
    capped = Vocab.build([["a", "b"], ["a", "c"], ["a", "b"]], min_freq=1, max_size=5)
    assert capped.tokens == [*SPECIAL_TOKENS, "a"]
    vocab.save(tmp_path)
    assert Vocab.load(tmp_path).tokens == vocab.tokens
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()[:4] == list(
        SPECIAL_TOKENS
    )


def test_vocab_rejects_files_without_special_tokens(tmp_path):
    (tmp_path / "vocab.txt").write_text("你好\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must start with"):
        Vocab.load(tmp_path)


def test_char_segmenter_splits_cjk_and_keeps_ascii_runs_whole():
    tokenizer = full_vocab_tokenizer(SAMPLE, segmenter="char")
    assert tokenizer.segment("iPhone 12好用吗？") == ["iPhone", "12", "好", "用", "吗", "？"]
    assert tokenizer.decode(tokenizer.encode("我喜欢听 Taylor Swift 的歌")) == (
        "我喜欢听Taylor Swift的歌"
    )
    assert "今天" not in tokenizer.vocab and "今" in tokenizer.vocab


def test_settings_of_the_shipped_manifest_still_load_and_unknown_segmenters_fail():
    shipped = {"normalization": "opencc-t2s+halfwidth+whitespace", "segmenter": "jieba",
               "char_fallback": True, "lowercase": False}
    assert TokenizerSettings(**shipped) == TokenizerSettings()
    assert TokenizerSettings(**{**shipped, "segmenter": "char"}).segmenter == "char"
    with pytest.raises(ValueError, match="unknown segmenter"):
        TokenizerSettings(segmenter="bpe")


ALPHABET = "你好天气今很我们abc XYZ123 ，。!?😀\u3000\t\n這個"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(ALPHABET), max_size=40))
def test_round_trip_property(text):
    """With every word known, decoding the encoding gives back the normalised text."""
    tokenizer = full_vocab_tokenizer([text])
    assert tokenizer.decode(tokenizer.encode(text)) == normalize(text)
    assert normalize(normalize(text)) == normalize(text)
    chars = full_vocab_tokenizer([text], segmenter="char")
    assert chars.decode(chars.encode(text)) == normalize(text)
