"""``python -m serve evaluate --data FILE``: reply quality on held-out pairs, no TensorFlow.

For each decoding mode (greedy, beam 5 with no-repeat-ngram, the same beam with the MMI
anti-LM, nucleus sampling, and, where the model folder has them, sampled replies reranked
by the forward and backward models and the hybrid mode: retrieved and generated replies
reranked) it reports
perplexity of the references, BLEU-1/2 on characters (sacrebleu), distinct-1/2 on
characters, average reply length, UNK rates, the share of all replies taken by the 10 most
frequent replies (the generic-reply problem), blocklist hits, empty replies, echoes of the
message and replies over 60 characters. ``--sheet`` writes every mode's reply to each
prompt as a sheet to rate by hand (sensible, specific: SSA). The decoding flags set
the options every mode starts from (``--max-length`` defaults to 30 here); each mode then
sets its own.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.runtime.blocklist import Blocklist, BlocklistError
from serve.runtime.flags import add_decoding_flags, decoding_kwargs
from serve.runtime.manifest import ModelError
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.paths import DEFAULT_BLOCKLIST, DEFAULT_MODEL
from serve.runtime.replies import ReplySources, select_reply
from serve.runtime.search import GenerationResult
from serve.runtime.tokenizer import normalize

MAX_REPLY_TOKENS = 30
# Chosen on the shipped model's validation pairs, never its test pairs: of the weights
# 0.4-0.7 and 2-3 steps tried, the best BLEU-2 (more weight: more varied, less on topic).
ANTILM_WEIGHT = 0.5
ANTILM_STEPS = 3


SAMPLING = {"sampling_topk": 0, "sampling_topp": 0.9, "sampling_temperature": 0.7}
RERANKED_SAMPLES = 4  # the model's proposals in the reranked modes


def decoding_modes(seed: int, sources: ReplySources | None = None,
                   generation: Mapping | None = None) -> dict[str, dict]:
    """The ways of answering that the report compares (CDial-GPT's sampling); the
    reranked modes only where the folder has what they need (``generation``: the folder's
    default settings, which the hybrid mode uses as the chat room does)."""
    beam5 = {"beam_size": 5, "no_repeat_ngram_size": 2, "length_penalty": 1.0}
    plain = {"reply_mode": "generate"}
    modes = {
        "greedy": plain,
        "beam5": {**plain, **beam5},
        "beam5_antilm": {**plain, **beam5, "antilm_weight": ANTILM_WEIGHT,
                         "antilm_steps": ANTILM_STEPS},
        "sampling": {**plain, **SAMPLING, "seed": seed},
    }
    if sources is not None and sources.scorer is not None and sources.scorer.has_backward:
        modes["sampling_mmi"] = {**plain, **SAMPLING, "seed": seed,
                                 "generated_candidates": RERANKED_SAMPLES}
    if sources is not None and sources.index is not None:
        # What the chat room serves: the folder's own generation settings.
        room = {k: v for k, v in (generation or {}).items() if k != "max_length"}
        modes["hybrid"] = {**SAMPLING, **room, "reply_mode": "hybrid", "seed": seed}
    return modes


@dataclass
class Pair:
    question: str
    answer: str


def read_pairs(path: Path, limit: int) -> list[Pair]:
    """question<TAB>answer lines (a checkpoint's valid.tsv, or any such file)."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{path}:{number}: expected question<TAB>answer")
        pairs.append(Pair(parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs[:limit] if limit else pairs


def read_prompts(path: Path) -> list[Pair]:
    """One message a line, with no reference reply (``--prompts``: replies to rate only)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    prompts = [Pair(line.strip(), "") for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def perplexity(model: OnnxSeq2Seq, pairs: list[Pair], batch_size: int = 64) -> float:
    """exp(mean negative log-likelihood) of the reference answers (and their </s>)."""
    return math.exp(reference_nll(model, pairs, batch_size)[0])


def char_perplexity(model: OnnxSeq2Seq, pairs: list[Pair], batch_size: int = 64) -> float:
    """The same likelihood per character of the references (and their </s>): comparable
    between models that cut text into different tokens (words or characters)."""
    _, total_nll, _ = reference_nll(model, pairs, batch_size)
    chars = sum(len(model.tokenizer.decode(model.tokenizer.encode(p.answer)[:MAX_REPLY_TOKENS]))
                + 1 for p in pairs)
    return math.exp(total_nll / chars)


def reference_nll(model: OnnxSeq2Seq, pairs: list[Pair], batch_size: int = 64
                  ) -> tuple[float, float, int]:
    """(mean NLL per token, total NLL, tokens) of the reference answers and their </s>."""
    tok = model.tokenizer
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        sources = [tok.encode(p.question)[-64:] or [model.unk_id] for p in batch]
        targets = [tok.encode(p.answer)[:MAX_REPLY_TOKENS] + [model.eos_id] for p in batch]
        state = model.encode(sources)
        width = max(len(t) for t in targets)
        target = np.full((len(batch), width), model.pad_id, np.int64)
        for i, t in enumerate(targets):
            target[i, : len(t)] = t
        prev = np.full(len(batch), model.bos_id, np.int64)
        h, c = state.h, state.c
        for step in range(width):
            out = model.step(prev, h, c, state.memory, state.memory_keys, state.src_mask)
            real = target[:, step] != model.pad_id
            picked = out.log_probs[np.arange(len(batch)), target[:, step]]
            total_nll -= float(picked[real].sum())
            total_tokens += int(real.sum())
            prev, h, c = target[:, step], out.h, out.c
    return total_nll / max(total_tokens, 1), total_nll, total_tokens


def distinct(replies: list[str], n: int) -> float:
    grams = [tuple(r[i : i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(replies: list[str], references: list[str], order: int) -> float:
    from sacrebleu.metrics import BLEU  # "zh" splits Chinese into characters

    metric = BLEU(tokenize="zh", max_ngram_order=order, effective_order=True)
    return metric.corpus_score(replies, [references]).score


def mode_options(base: Mapping | None, mode: dict, blocklist: Blocklist,
                 pair_index: int = 0, *, enforced: tuple[str, ...] = ()) -> DecodingOptions:
    """A mode's options for one pair: the base options, the mode's own, the blocklist's
    words suppressed, and a sampling seed of its own per pair.

    ``enforced`` are the words the model folder's own blocklist suppresses anyway (its
    rules always hold them): only the others are added, so that a request's
    ``suppress_words`` stays within its cap."""
    base = {"max_length": MAX_REPLY_TOKENS, **(base or {})}
    extra = tuple(w for w in blocklist.words if w not in set(enforced))
    words = (*base.get("suppress_words", ()), *extra)
    options = {**base, **mode, "suppress_words": words}
    if "seed" in mode:  # proposals take seed, seed+1, ...: pairs' seeds must not overlap
        options["seed"] = mode["seed"] + pair_index * RERANKED_SAMPLES
    return DecodingOptions(**options)


def is_echo(reply: str, message: str) -> bool:
    """The reply repeats the message (the whole message, or inside a longer reply)."""
    said, text = normalize(message), normalize(reply)
    return bool(said) and (text == said or (len(said) >= 4 and said in text))


def answer_all(model: OnnxSeq2Seq, sources: ReplySources, questions: list[str], options: dict,
               blocklist: Blocklist, base: Mapping | None = None) -> list[GenerationResult]:
    return [select_reply(model, sources, q, mode_options(
                base, options, blocklist, i, enforced=model.blocklist_words))
            for i, q in enumerate(questions)]


def mode_report(
    model: OnnxSeq2Seq, pairs: list[Pair], options: dict, blocklist: Blocklist,
    base: Mapping | None = None, sources: ReplySources | None = None,
) -> tuple[dict, list[str]]:
    started = time.monotonic()
    results = answer_all(model, sources or ReplySources(), [p.question for p in pairs],
                         options, blocklist, base)
    replies = [r.text for r in results]
    tokens = sum(len(r.token_ids) for r in results)
    unks = sum(t == model.unk_id for r in results for t in r.token_ids)
    top10 = sum(n for _, n in Counter(replies).most_common(10))
    references = [p.answer for p in pairs]
    with_references = all(references)
    report = {
        "bleu1": bleu(replies, references, 1) if with_references else None,
        "bleu2": bleu(replies, references, 2) if with_references else None,
        "distinct1": distinct(replies, 1),
        "distinct2": distinct(replies, 2),
        "avg_length": float(np.mean([len(r) for r in replies])),
        "reply_unk_rate": unks / max(tokens, 1),
        "top10_share": top10 / len(replies),
        "blocklist_hits": sum(bool(blocklist.hits(r)) for r in replies),
        "empty": sum(not r for r in replies),
        "echoes": sum(is_echo(r, p.question) for r, p in zip(replies, pairs, strict=True)),
        "over_60_chars": sum(len(r) > 60 for r in replies),
        "retrieved_share": sum(r.source == "retrieved" for r in results) / len(results),
        "seconds": round(time.monotonic() - started, 1),
    }
    return report, replies


def source_unk_rate(model: OnnxSeq2Seq, pairs: list[Pair]) -> float:
    ids = [t for p in pairs for t in model.tokenizer.encode(p.question)]
    return sum(t == model.unk_id for t in ids) / max(len(ids), 1)


def evaluate(
    model: OnnxSeq2Seq, pairs: list[Pair], blocklist: Blocklist, *, seed: int = 0,
    base: Mapping | None = None, sources: ReplySources | None = None,
    modes: Sequence[str] = (),
) -> tuple[dict, dict[str, list[str]]]:
    """The whole report (one dict per mode, plus shared figures) and every reply;
    ``base``: the DecodingOptions keyword arguments every mode starts from; ``modes``: only
    these (default: every mode the folder allows). Prompts without references get no
    perplexity nor BLEU."""
    with_references = all(p.answer for p in pairs)
    report: dict = {
        "model": model.manifest.name,
        "pairs": len(pairs),
        "perplexity": perplexity(model, pairs) if with_references else None,
        "char_perplexity": char_perplexity(model, pairs) if with_references else None,
        "source_unk_rate": source_unk_rate(model, pairs),
        "modes": {},
    }
    replies = {}
    available = decoding_modes(seed, sources, model.manifest.generation)
    unknown = sorted(set(modes) - set(available))
    if unknown:
        raise ValueError(f"no mode {', '.join(unknown)} for this folder; it has "
                         f"{', '.join(available)}")
    for name, options in available.items():
        if modes and name not in modes:
            continue
        report["modes"][name], replies[name] = mode_report(model, pairs, options, blocklist,
                                                           base, sources)
    return report, replies


def markdown_table(report: dict) -> str:
    columns = ["bleu1", "bleu2", "distinct1", "distinct2", "avg_length", "reply_unk_rate",
               "top10_share", "blocklist_hits", "empty", "echoes", "over_60_chars",
               "retrieved_share"]
    lines = [
        f"model `{report['model']}` on {report['pairs']} held-out pairs: perplexity "
        f"{fmt(report['perplexity'])} (per character {fmt(report['char_perplexity'])}), source "
        f"UNK rate {report['source_unk_rate']:.2%}",
        "",
        "| decoding | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for mode, figures in report["modes"].items():
        cells = [f"{figures[c]:.3f}" if isinstance(figures[c], float)
                 else "-" if figures[c] is None else str(figures[c]) for c in columns]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_table(pairs: list[Pair], replies: dict[str, list[str]], n: int, seed: int) -> str:
    """``n`` exchanges drawn at random with a fixed seed (not hand-picked)."""
    picked = sample_indices(len(pairs), n, seed)
    lines = ["| question | reference | " + " | ".join(replies) + " |",
             "| --- | --- |" + " --- |" * len(replies)]
    cell = lambda s: s.replace("|", "\\|") or "(empty)"  # noqa: E731
    for i in picked:
        row = [pairs[i].question, pairs[i].answer, *(r[i] for r in replies.values())]
        lines.append("| " + " | ".join(cell(s) for s in row) + " |")
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def rating_sheet(questions: list[str], replies: dict[str, list[str]]) -> str:
    """A TSV to rate by hand: one row per (prompt, mode), with empty ``sensible`` and
    ``specific`` columns (1 or 0; SSA is the mean of their two shares)."""
    lines = ["prompt\tmode\treply\tsensible\tspecific"]
    for i, question in enumerate(questions):
        for mode, texts in replies.items():
            lines.append(f"{question}\t{mode}\t{texts[i]}\t\t")
    return "\n".join(lines) + "\n"


def ssa_table(path: Path) -> str:
    """Sensibleness, specificity and SSA per mode from a rated sheet (``--sheet``'s file
    with its ``sensible`` and ``specific`` columns filled with 1 or 0). As in Meena
    (Adiwardana et al. 2020), a reply that is not sensible is not specific either."""
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    by_mode: dict[str, list[tuple[int, int]]] = {}
    for number, row in enumerate(rows, 2):
        if len(row) != 5 or row[3] not in ("0", "1") or row[4] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: expected prompt, mode, reply, sensible (0/1), "
                             f"specific (0/1)")
        sensible = int(row[3])
        by_mode.setdefault(row[1], []).append((sensible, sensible * int(row[4])))
    lines = ["| mode | rated | sensible | specific | SSA |", "| --- | ---: | ---: | ---: | ---: |"]
    for mode, marks in by_mode.items():
        sensible = sum(s for s, _ in marks) / len(marks)
        specific = sum(s for _, s in marks) / len(marks)
        lines.append(f"| {mode} | {len(marks)} | {sensible:.0%} | {specific:.0%} | "
                     f"{(sensible + specific) / 2:.0%} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="held-out question<TAB>answer pairs, e.g. a checkpoint's test.tsv")
    source.add_argument("--ssa", type=Path,
                        help="a rated sheet: print sensibleness, specificity and SSA per mode")
    source.add_argument("--prompts", type=Path,
                        help="messages, one a line, with no reference (replies and variety "
                             "only: no perplexity, no BLEU), e.g. data/everyday_messages.txt")
    parser.add_argument("--modes", default="",
                        help="comma-separated modes to run (default: every mode the folder "
                             "allows: greedy, beam5, beam5_antilm, sampling, sampling_mmi, "
                             "hybrid)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder")
    parser.add_argument("--limit", type=int, default=1000, help="pairs to use (0 = all)")
    parser.add_argument("--blocklist", type=Path, default=DEFAULT_BLOCKLIST,
                        help="words suppressed in replies and counted as hits")
    parser.add_argument("--samples", type=int, default=0,
                        help="also print this many random exchanges")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    parser.add_argument("--sheet", type=Path, default=None,
                        help="write a rating sheet (TSV: prompt, mode, reply, sensible, "
                             "specific) of --sheet-samples random pairs")
    parser.add_argument("--sheet-samples", type=int, default=0,
                        help="pairs drawn for the sheet (same seed as --samples; 0 = all)")
    parser.add_argument("--sheet-modes", default="",
                        help="comma-separated modes in the sheet (default: every mode run)")
    # The sampling mode's seed is --seed + the pair's index; scores are not reported.
    add_decoding_flags(parser, defaults={"max_length": MAX_REPLY_TOKENS, "seed": 0},
                       exclude=("return_scores", "return_candidates"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ssa:
        try:
            print(ssa_table(args.ssa))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    base = decoding_kwargs(args)
    seed = base.pop("seed")
    try:
        # A clash is an error before loading.
        for name, mode in decoding_modes(seed, ReplySources()).items():
            try:
                mode_options(base, mode, Blocklist())
            except ValueError as e:
                raise ValueError(f"the {name} mode with these options: {e}") from None
        pairs = (read_pairs(args.data, args.limit) if args.data
                 else read_prompts(args.prompts)[: args.limit or None])
        blocklist = Blocklist.load(args.blocklist)
        model = OnnxSeq2Seq.load(args.model)
        sources = ReplySources.load(model)
    except (ModelError, BlocklistError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        report, replies = evaluate(model, pairs, blocklist, seed=seed, base=base,
                                   sources=sources, modes=modes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    if args.samples:
        print()
        print(samples_table(pairs, replies, args.samples, seed))
    if args.json:
        args.json.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    if args.sheet:
        picked = sample_indices(len(pairs), args.sheet_samples, seed)
        wanted = [m.strip() for m in args.sheet_modes.split(",") if m.strip()] or replies
        args.sheet.write_text(rating_sheet([pairs[i].question for i in picked],
                                           {m: [replies[m][i] for i in picked] for m in wanted}),
                              encoding="utf-8")
    return 0


def sample_indices(total: int, n: int, seed: int) -> list[int]:
    """``n`` indices drawn at random with a fixed seed (all of them when n is 0)."""
    if not n or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))
