"""The token rules: repetition, n-grams, suppressed words, and their vocabulary scans."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serve.runtime.options import DecodingOptions
from serve.runtime.rules import (
    SCAN_CACHE_SIZE,
    TokenRules,
    WordGuard,
    apply_count_penalties,
    apply_repetition_penalty,
    ids_containing,
    ngram_blocked_ids,
    process_rows,
    vocabulary_scans,
    word_guard,
)
from serve.runtime.tokenizer import detokenize

# -- the logit rules ------------------------------------------------------------------------


def test_repetition_penalty_lowers_only_generated_tokens():
    log_probs = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    out = apply_repetition_penalty(log_probs, [2, 2, 3], 1.5)
    np.testing.assert_allclose(out[[0, 1]], log_probs[[0, 1]])
    np.testing.assert_allclose(out[[2, 3]], log_probs[[2, 3]] * 1.5)
    assert apply_repetition_penalty(log_probs, [2], 1.0) is log_probs


def test_count_penalties_follow_openai_definition():
    log_probs = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    out = apply_count_penalties(log_probs, [2, 2, 3], frequency=0.5, presence=0.25)
    np.testing.assert_allclose(out[[0, 1]], log_probs[[0, 1]])
    np.testing.assert_allclose(out[2], log_probs[2] - (0.5 * 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(out[3], log_probs[3] - (0.5 * 1 + 0.25), rtol=1e-6)
    assert apply_count_penalties(log_probs, [2], 0.0, 0.0) is log_probs
    assert apply_count_penalties(log_probs, [], 1.0, 1.0) is log_probs
    # negative values encourage repeats
    assert apply_count_penalties(log_probs, [0], 0.0, -2.0)[0] > log_probs[0]


def test_penalties_in_the_rules_change_the_renormalized_row():
    log_probs = np.log(np.array([0.1] * 4 + [0.3, 0.3], np.float32))
    plain = _rules(min_length=0).process(log_probs, [4, 4])
    assert np.isclose(plain[4], plain[5])
    frequency = _rules(min_length=0, frequency_penalty=1.0).process(log_probs, [4, 4])
    presence = _rules(min_length=0, presence_penalty=1.0).process(log_probs, [4, 4, 5])
    assert frequency[4] < frequency[5] and np.isclose(np.exp(frequency).sum(), 1.0)
    np.testing.assert_allclose(frequency[5] - frequency[4], 2.0, rtol=1e-5)
    np.testing.assert_allclose(presence[4], presence[5], rtol=1e-6)  # once each, not per count
    assert presence[4] < plain[4]


@pytest.mark.parametrize("value", [-2.5, 2.01, float("nan"), "1"])
def test_penalties_are_checked(value):
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=name):
            DecodingOptions(**{name: value})


def test_ngram_blocking():
    assert ngram_blocked_ids([5, 6, 7, 5], 2) == [6]  # "5 6" exists: after 5, 6 is banned
    assert sorted(ngram_blocked_ids([5, 6, 7, 5, 6], 3)) == [7]
    assert sorted(ngram_blocked_ids([5, 6, 5], 1)) == [5, 6]
    assert ngram_blocked_ids([5, 6], 0) == []
    assert ngram_blocked_ids([5], 3) == []


def _rules(**options) -> TokenRules:
    return TokenRules(DecodingOptions(**options), eos_id=3, banned=np.array([0, 1, 2]))


def test_rules_ban_specials_and_early_end_and_renormalize():
    log_probs = np.log(np.full(8, 1 / 8, np.float32))
    out = _rules(min_length=2).process(log_probs, [5])
    assert np.all(np.isneginf(out[[0, 1, 2, 3]]))  # <pad> <unk> <s> banned, </s> too early
    assert np.isclose(np.exp(out).sum(), 1.0)
    assert np.isfinite(_rules(min_length=2).process(log_probs, [5, 6])[3])  # long enough


def test_rules_fall_back_to_ending_when_everything_is_banned():
    log_probs = np.log(np.full(6, 1 / 6, np.float32))
    out = _rules(no_repeat_ngram_size=1, min_length=0).process(log_probs, [4, 5])
    assert int(np.argmax(out)) == 3


def test_rules_of_a_row_do_not_depend_on_the_other_rows():
    rng = np.random.default_rng(1)
    vocab = 3000
    rules = [
        TokenRules(
            DecodingOptions(repetition_penalty=1.0 + 0.2 * (i % 2), no_repeat_ngram_size=i % 3,
                            min_length=i % 4, presence_penalty=0.3 * (i % 3) - 0.3,
                            frequency_penalty=0.7 * (i % 2)),
            eos_id=3, banned=np.array([0, 1, 2]),
        )
        for i in range(33)
    ]  # fmt: skip
    histories = [rng.integers(4, vocab, size=i % 7).tolist() for i in range(33)]
    for size in (1, 2, 7, 33):
        batch = np.log(rng.dirichlet(np.ones(vocab), size=size)).astype(np.float32)
        together = process_rows(batch, rules[:size], histories[:size])
        for i in range(size):
            alone = process_rows(batch[i : i + 1], rules[i : i + 1], histories[i : i + 1])
            np.testing.assert_array_equal(together[i], alone[0])


# -- the vocabulary scans -------------------------------------------------------------------


def test_ids_containing(model):
    piece = model.tokenizer.id_to_piece(10)
    ids = ids_containing(model, (piece[0],))
    assert 10 in ids
    assert all(piece[0] in model.tokenizer.id_to_piece(int(i)) for i in ids)
    assert ids_containing(model, ()).size == 0


def test_the_scans_are_cached_per_model_and_bounded(model):
    scans = vocabulary_scans(model)
    first = ("你好",)
    assert word_guard(model, first) is word_guard(model, first)  # built once
    assert ids_containing(model, first) is ids_containing(model, first)
    for i in range(3 * SCAN_CACHE_SIZE):  # every request with a word list of its own
        TokenRules.for_model(model, DecodingOptions(suppress_words=(f"词{i}",)))
        word_guard(model, first)  # used all along: the least recently used go, not it
    assert len(scans.word_guards) == len(scans.ids_containing) == SCAN_CACHE_SIZE
    assert word_guard(model, first) is word_guard(model, first)


@pytest.mark.timeout(60)
async def test_the_engine_builds_rules_off_the_event_loop(model, monkeypatch):
    from serve.runtime import engine as engine_module

    threads = []
    built = engine_module.TokenRules.for_model

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return built(*args, **kwargs)

    monkeypatch.setattr(engine_module.TokenRules, "for_model", recording)
    engine = engine_module.Engine(model)
    await engine.start()
    try:
        await asyncio.gather(*(engine.generate("你好", max_length=3, suppress_words=(f"字{i}",))
                               for i in range(4)))
    finally:
        await engine.stop()
    assert len(threads) == 4 and threading.main_thread() not in threads


def test_the_model_knows_nothing_of_the_rules():
    """No import cycle: the model is below the rules and the search, not beside them."""
    import ast
    import inspect

    from serve.runtime import model as model_module

    tree = ast.parse(inspect.getsource(model_module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"serve.runtime.rules", "serve.runtime.search",
                           "serve.runtime.options"}


def test_renormalising_by_the_removed_mass_equals_a_full_log_softmax():
    rng = np.random.default_rng(7)
    vocab, size = 500, 9
    rules = [TokenRules(DecodingOptions(repetition_penalty=1.0 + 0.3 * (i % 2),
                                        no_repeat_ngram_size=i % 4, min_length=i % 3,
                                        frequency_penalty=0.4 * (i % 3)),
                        eos_id=3, banned=np.array([0, 1, 2, 7, 7])) for i in range(size)]
    histories = [rng.integers(4, 12, size=i).tolist() for i in range(size)]  # repeats
    batch = np.log(rng.dirichlet(np.ones(vocab) * 0.3, size=size)).astype(np.float32)
    out = process_rows(batch, rules, histories)
    for i in range(size):
        row = batch[i].copy()
        rules[i].mask_row(row, histories[i])
        expected = row - np.logaddexp.reduce(row[np.isfinite(row)].astype(np.float64))
        np.testing.assert_array_equal(np.isneginf(out[i]), np.isneginf(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(out[i][finite], expected[finite], atol=2e-5)
    assert ngram_blocked_ids([1, 2, 3, 9, 1, 2, 3], 4) == [9]


# -- process_rows against a straightforward reference ---------------------------------------

ALPHABET = "傻逼笨蛋你好我是谁呀"


def _reference_row(row: np.ndarray, rules: TokenRules, previous: list[int]) -> np.ndarray:
    """One row the plain way: penalties one by one, every ban written, a float64
    log-softmax over what is left (or only ``</s>`` when nothing is)."""
    o = rules.options
    row = apply_count_penalties(
        apply_repetition_penalty(row, previous, o.repetition_penalty),
        previous, o.frequency_penalty, o.presence_penalty).copy()
    banned = set(rules.banned.tolist()) | set(ngram_blocked_ids(previous, o.no_repeat_ngram_size))
    if rules.guard is not None and previous:
        banned |= {int(i) for ids in rules.guard.banned(previous) for i in ids}
    if len(previous) < o.min_length:
        banned.add(rules.eos_id)
    row[sorted(banned)] = -np.inf
    if not np.isfinite(row).any():
        row[:] = -np.inf
        row[rules.eos_id] = 0.0
        return row
    return row - np.logaddexp.reduce(row[np.isfinite(row)].astype(np.float64))


def _random_rules(rng: np.random.Generator, guard: WordGuard, vocab: int) -> TokenRules:
    options = DecodingOptions(
        repetition_penalty=float(rng.choice([1.0, 1.0, 1.2, 2.5])),
        no_repeat_ngram_size=int(rng.choice([0, 1, 2, 3, 4])),
        min_length=int(rng.integers(0, 6)),
        frequency_penalty=float(rng.choice([0.0, 0.0, 0.4, 2.0])),
        presence_penalty=float(rng.choice([0.0, 0.0, 0.3, -1.0])),
    )
    banned = rng.integers(0, vocab, size=int(rng.integers(0, 6)))  # repeats, maybe </s>
    return TokenRules(options, eos_id=3, banned=np.concatenate([[0, 1, 2], banned]),
                      guard=guard if rng.random() < 0.7 else None)


def _random_batch(seed: int, size: int, vocab: int = 400):
    rng = np.random.default_rng(seed)
    pieces = ["<pad>", "<unk>", "<s>", "</s>"] + [
        "".join(rng.choice(list(ALPHABET), size=int(rng.integers(1, 3)))) for _ in range(vocab - 4)]
    guard = WordGuard.build(pieces, ("傻逼", "笨蛋", "谁呀"))
    rules = [_random_rules(rng, guard, vocab) for _ in range(size)]
    # few distinct tokens: repeats, n-grams seen before, guard endings
    histories = [rng.integers(4, 40, size=int(rng.integers(0, 12))).tolist() for _ in range(size)]
    alpha = rng.choice([0.05, 0.3, 1.0], size=size)[:, None]
    batch = np.log(rng.dirichlet(np.ones(vocab), size=size) ** (1 / alpha))
    batch = (batch - np.logaddexp.reduce(batch, axis=1, keepdims=True)).astype(np.float32)
    for i in range(size):  # some rows that the rules (nearly) empty
        if rng.random() < 0.1:
            batch[i] = np.log(np.full(vocab, 1e-9 / vocab, np.float32))
            batch[i, rules[i].banned[0]] = np.log1p(-1e-9)
    return batch, rules, histories


@pytest.mark.parametrize("seed", range(12))
def test_process_rows_equals_the_reference_alone_and_in_any_batch(seed):
    batch, rules, histories = _random_batch(seed, size=32)
    together = process_rows(batch, rules, histories)
    in_place = process_rows(batch.copy(), rules, histories, in_place=True)
    np.testing.assert_array_equal(in_place, together)
    for i in range(len(batch)):
        expected = _reference_row(batch[i], rules[i], histories[i])
        np.testing.assert_array_equal(np.isneginf(together[i]), np.isneginf(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(together[i][finite], expected[finite], rtol=1e-6, atol=1e-5)
        alone = process_rows(batch[i : i + 1], rules[i : i + 1], histories[i : i + 1])
        np.testing.assert_array_equal(alone[0], together[i])  # bit for bit
        assert np.array_equal(rules[i].process(batch[i], histories[i]), alone[0])
    half = process_rows(batch[::2], rules[::2], histories[::2])  # other neighbours
    np.testing.assert_array_equal(half, together[::2])


def test_the_reference_batches_hit_every_rule():
    """The random batches above exercise what they claim to (else the test proves less)."""
    hits = dict.fromkeys(("guard", "ngram", "penalty", "early_end", "emptied"), 0)
    for seed in range(12):
        batch, rules, histories = _random_batch(seed, size=32)
        for row, r, previous in zip(batch, rules, histories, strict=True):
            hits["guard"] += bool(r.guard and r.guard.banned(previous))
            hits["ngram"] += bool(ngram_blocked_ids(previous, r.options.no_repeat_ngram_size))
            hits["penalty"] += bool(previous) and r.options.repetition_penalty != 1.0
            hits["early_end"] += len(previous) < r.options.min_length
            hits["emptied"] += bool(row.max() > -1e-6)
    assert min(hits.values()) >= 5, hits


def test_ngram_blocking_equals_a_brute_force_search():
    rng = np.random.default_rng(5)
    for _ in range(500):
        previous = rng.integers(0, 4, size=int(rng.integers(0, 12))).tolist()
        n = int(rng.integers(1, 5))
        prefix = previous[len(previous) - n + 1 :] if n > 1 else []
        expected = {previous[i + n - 1] for i in range(len(previous) - n + 1)
                    if previous[i : i + n - 1] == prefix}
        assert set(ngram_blocked_ids(previous, n)) == expected, (previous, n)


def test_in_place_spends_only_what_it_may():
    batch, rules, histories = _random_batch(3, size=4)
    expected = process_rows(batch, rules, histories)
    mine = batch.copy()
    assert process_rows(mine, rules, histories, in_place=True) is mine  # no copy
    frozen = batch.copy()
    frozen.flags.writeable = False  # e.g. another framework's output
    np.testing.assert_array_equal(process_rows(frozen, rules, histories, in_place=True),
                                  expected)
    np.testing.assert_array_equal(frozen, batch)
    wide = batch.astype(np.float64)  # not float32: converted, the caller's left alone
    np.testing.assert_array_equal(process_rows(wide, rules, histories, in_place=True),
                                  expected)
    np.testing.assert_array_equal(wide, batch.astype(np.float64))


def _unfiltered_guard_bans(guard: WordGuard, previous: list[int]) -> list[np.ndarray]:
    """WordGuard.banned as it was before its per-token prefilter: the tail read always."""
    tail = detokenize([guard.pieces[t] for t in previous[-guard.longest:]]).lower()
    endings = (tail[-k:] for k in range(1, min(guard.longest, len(tail)) + 1))
    return [guard.by_ending[e] for e in endings if e in guard.by_ending]


def test_the_guards_prefilter_skips_only_tails_that_end_no_word():
    # Latin words (a space between them), capitals, a capital sigma, an empty piece.
    pieces = ["<pad>", "<unk>", "<s>", "</s>", "傻", "逼", "Sb", "s", "B", "ΑΣ", "ς", "",
              "小", "黄", "鸡", "abc", "笨", "蛋", "Α", "Σ", "好"]
    guard = WordGuard.build(pieces, ("傻逼", "sb", "小黄鸡", "ας好", "笨蛋"))
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(3000):
        previous = rng.integers(4, len(pieces), size=int(rng.integers(1, 6))).tolist()
        if rng.random() < 0.3:  # the tricky tails: "", Α Σ, 小 黄 in some order
            previous += rng.permutation([11, 12, 13, 18, 19])[:2].tolist()
        expected = _unfiltered_guard_bans(guard, previous)
        found = guard.banned(previous)
        assert [a.tolist() for a in found] == [a.tolist() for a in expected], previous
        hits += bool(expected)
    assert hits > 300  # the tails did end words


def test_rules_for_the_same_words_share_their_bans(model):
    first = TokenRules.for_model(model, DecodingOptions(min_length=3))
    again = TokenRules.for_model(model, DecodingOptions(sampling_topk=5))
    assert again.banned is first.banned and again.guard is first.guard  # resolved once
    assert not first.banned.flags.writeable  # shared: nobody may write into them
    other = TokenRules.for_model(model, DecodingOptions(suppress_words=("你好",)))
    assert other.banned is not first.banned
    assert set(first.banned.tolist()) < set(other.banned.tolist())
