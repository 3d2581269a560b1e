"""``DecodingOptions``: how one request is decoded, checked once when it is made."""

from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import dataclass, fields

REPLY_MODES = (None, "hybrid", "generate")
MAX_RETRIEVAL_CANDIDATES = 32
MAX_GENERATED_CANDIDATES = 8
MAX_TOP_LOG_PROBS = 20
# The ceilings of one request's work, wherever it comes from (the API, the chat room,
# ``ask``, ``evaluate``, the engine): a server's settings may lower them, never raise
# them. Each bounds a cost that grows with it: decoder steps per row (max_length), the
# beam's [k, V] arrays (beam_size; 5,000 took 2.6 GB), the n-gram scan at every step
# (no_repeat_ngram_size), and the vocabulary scan a new word list costs in a worker
# thread (suppress_words: 64 words of 32 characters take about 4 s on 12,000 pieces).
MAX_LENGTH = 1024
MAX_BEAM_SIZE = 16
MAX_NO_REPEAT_NGRAM_SIZE = 16
MAX_SUPPRESS_WORDS = 64
MAX_SUPPRESS_WORD_CHARS = 32
# What a newly exported model folder serves the chat room with (its manifest's
# "generation"): nucleus sampling as CDial-GPT (p 0.9, T 0.7), repeats discouraged, and
# in the hybrid mode one sample beside eight retrieved replies (with two samples, the
# shipped model chose a sample for 0.3% of the test messages, at twice the decoding).
DEFAULT_GENERATION = {
    "max_length": 30, "sampling_topk": 0, "sampling_topp": 0.9, "sampling_temperature": 0.7,
    "repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "retrieval_candidates": 8,
    "generated_candidates": 1,
}


@dataclass(frozen=True, kw_only=True)
class DecodingOptions:
    """How to decode one request. Names follow CTranslate2's ``translate_batch`` where it
    has the option (``min_length``/``max_length`` are its ``min_decoding_length`` and
    ``max_decoding_length``), so whoever knows one knows the other.

    Arguments:
      beam_size: 1 = greedy or sampling, one token at a time (the engine streams it);
        > 1 = beam search, whose n-best comes at once at the end; at most 16. (default
        1; CTranslate2: 2)
      num_hypotheses: How many of the beam's hypotheses to return, best first
        (<= beam_size). (default 1)
      length_penalty: A hypothesis's score is sum(log p) / length ** length_penalty.
        (default 1.0)
      repetition_penalty: > 1 makes already generated tokens less likely (their
        log-prob is multiplied by it). (default 1.0)
      no_repeat_ngram_size: > 0: never repeat an n-gram of this size (0 = off); at
        most 16. (default 0)
      presence_penalty: OpenAI's: subtracted from the log-prob of every token the reply
        already has, once; in [-2, 2], < 0 encourages repeats. (default 0.0)
      frequency_penalty: OpenAI's: subtracted from a token's log-prob once per time the
        reply already has it; in [-2, 2]. (default 0.0)
      min_length: </s> is forbidden before this many reply tokens. (default 1)
      max_length: Reply tokens at most (finish_reason "length" when reached), at most
        1024. (default 40; CTranslate2: 256)
      sampling_temperature: > 1 flatter, < 1 sharper (sampling only). (default 1.0)
      sampling_topk: 1 = greedy (argmax); k > 1 = sample among the k most likely
        tokens; 0 = among the whole vocabulary. (default 1)
      sampling_topp: Nucleus: sample among the smallest set of most likely tokens whose
        probability reaches this. (default 1.0)
      seed: Sampling seed: the same seed gives the same reply (None = a fresh one).
        (default None)
      disable_unk: Never produce <unk>. (default True; CTranslate2: False)
      suppress_words: No token whose piece contains one of these words, nor one that
        would finish such a word spelled across tokens; the model folder's blocklist is
        always added. At most 64 words of at most 32 characters. (default ())
      antilm_weight: MMI-antiLM (Li et al. 2016), beam search only: for the first
        antilm_steps reply tokens subtract this x the log-prob the decoder gives the
        token with no question at all, so replies any question would get ("我也是")
        lose; in [0, 1), 0 = off. (default 0.0)
      antilm_steps: Reply tokens the anti-LM applies to. (default 3)
      return_scores: Fill GenerationResult.score and the hypotheses' scores. (default
        False)
      return_log_probs: Greedy and sampling: fill GenerationResult.log_probs, each reply
        token's log-prob as the choice was made from it (after the rules, renormalized,
        before temperature). (default False)
      top_log_probs: With return_log_probs: also the this many most likely tokens at
        each step, at most 20. (default 0)
      reply_mode: "hybrid": the reply is chosen among retrieved replies (the folder's
        reply index) and the model's own, reranked by the forward and backward models;
        "generate": the model's own replies only (reranked when there are several).
        None = hybrid when the model folder has a reply index. (default None)
      retrieval_candidates: Hybrid: how many retrieved replies (of the most similar
        questions) are considered, at most 32. (default 8)
      generated_candidates: How many replies the model proposes for reranking when
        sampling (seeds seed, seed+1, ...), at most 8; a beam proposes its
        num_hypotheses, greedy one. (default 1)
      return_candidates: Fill GenerationResult.candidates with every candidate and its
        scores. (default False)

    Where the defaults differ from CTranslate2's, it is for a chat reply: a streamed
    reply needs beam_size 1 (a beam's best is only known at its end); a reply is a
    sentence, not a document (max_length 40); and a reply showing <unk> says nothing
    (disable_unk). CTranslate2 has no seed (``ctranslate2.set_random_seed`` is global) and
    no anti-LM; its ``suppress_sequences`` are token sequences, not words.
    """

    beam_size: int = 1
    num_hypotheses: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int = 1
    max_length: int = 40
    sampling_temperature: float = 1.0
    sampling_topk: int = 1
    sampling_topp: float = 1.0
    seed: int | None = None
    disable_unk: bool = True
    suppress_words: tuple[str, ...] = ()
    antilm_weight: float = 0.0
    antilm_steps: int = 3
    return_scores: bool = False
    return_log_probs: bool = False
    top_log_probs: int = 0
    reply_mode: str | None = None
    retrieval_candidates: int = 8
    generated_candidates: int = 1
    return_candidates: bool = False

    def __post_init__(self) -> None:
        words = self.suppress_words
        if isinstance(words, str):
            words = (words,)
        if not isinstance(words, list | tuple | set | frozenset) or not all(
            isinstance(w, str) for w in words
        ):
            raise ValueError(f"suppress_words must be a list of strings, got {words!r}")
        object.__setattr__(self, "suppress_words", tuple(sorted(set(words))))
        _validate_once(self)

    @classmethod
    def from_kwargs(cls, **kwargs) -> DecodingOptions:
        """Options from keyword arguments; an unknown name is a ValueError that lists the
        known ones (a misspelt option must not be silently ignored)."""
        known = _names(cls)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown decoding option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    @property
    def sampling(self) -> bool:
        return self.sampling_topk != 1

    def validate(self) -> None:
        validate(self)


@functools.cache
def _names(cls: type) -> frozenset[str]:
    """The option names (``fields()`` walks the class each time: once is enough)."""
    return frozenset(f.name for f in fields(cls))


def option_docs() -> dict[str, str]:
    """Each option's entry of the ``DecodingOptions`` docstring, joined on one line."""
    docs: dict[str, str] = {}
    name = None
    section = inspect.cleandoc(DecodingOptions.__doc__ or "").split("Arguments:\n", 1)[1]
    for line in section.split("\n\n", 1)[0].splitlines():
        entry = re.match(r"  (\w+): (.*)", line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2).strip()
        elif name is not None:
            docs[name] += " " + line.strip()
    return docs


def option_help(name: str) -> str:
    """An option's meaning, without its default (a command may have its own)."""
    return option_docs()[name].rsplit(" (default ", 1)[0]


def _integer(options: DecodingOptions, name: str, low: int) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _number(options: DecodingOptions, name: str) -> float:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


# Option -> its ceiling; ``check_caps`` takes a server's lower ones in the same shape.
CAPS = {"max_length": MAX_LENGTH, "min_length": MAX_LENGTH, "beam_size": MAX_BEAM_SIZE,
        "num_hypotheses": MAX_BEAM_SIZE, "no_repeat_ngram_size": MAX_NO_REPEAT_NGRAM_SIZE,
        "retrieval_candidates": MAX_RETRIEVAL_CANDIDATES,
        "generated_candidates": MAX_GENERATED_CANDIDATES, "top_log_probs": MAX_TOP_LOG_PROBS,
        "suppress_words": MAX_SUPPRESS_WORDS, "suppress_word_chars": MAX_SUPPRESS_WORD_CHARS}


def check_caps(o: DecodingOptions, caps: dict[str, int]) -> None:
    """Each capped option within ``caps`` (``CAPS``, or a server's lower ones): a
    ValueError that begins with the option's name."""
    for name, cap in caps.items():
        if name == "suppress_words":
            if len(o.suppress_words) > cap:
                raise ValueError(f"suppress_words must have at most {cap} words, got "
                                 f"{len(o.suppress_words)}")
        elif name == "suppress_word_chars":
            longest = max(map(len, o.suppress_words), default=0)
            if longest > cap:
                raise ValueError(f"suppress_words must be words of at most {cap} "
                                 f"characters, got one of {longest}")
        elif getattr(o, name) > cap:  # each is work for one request: bounded
            raise ValueError(f"{name} must be at most {cap}, got {getattr(o, name)!r}")


# Option values already found valid (with their types: True == 1 and 1.0 == 1, but
# neither is a valid beam_size): a request's options are remade several times on their
# way to the engine (``dataclasses.replace``), each a full validation otherwise.
_VALID: set[tuple] = set()
_VALID_MAX = 1024


def _validate_once(o: DecodingOptions) -> None:
    values = tuple(o.__dict__.values())
    key = (values, tuple(map(type, values)))
    try:
        if key in _VALID:
            return
    except TypeError:  # an unhashable value: never valid, validate says why
        validate(o)
        return
    validate(o)
    if len(_VALID) >= _VALID_MAX:  # bounded: many distinct requests start it afresh
        _VALID.clear()
    _VALID.add(key)


def validate(o: DecodingOptions) -> None:
    """Each value in its range, and the values consistent with each other."""
    for name, low in (("beam_size", 1), ("num_hypotheses", 1), ("no_repeat_ngram_size", 0),
                      ("min_length", 0), ("max_length", 1), ("sampling_topk", 0),
                      ("antilm_steps", 0), ("retrieval_candidates", 1),
                      ("generated_candidates", 1), ("top_log_probs", 0)):
        _integer(o, name, low)
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= _number(o, name) <= 2:
            raise ValueError(f"{name} must be in [-2, 2], got {getattr(o, name)!r}")
    _number(o, "length_penalty")
    if not 0 <= _number(o, "antilm_weight") < 1:
        raise ValueError(f"antilm_weight must be in [0, 1), got {o.antilm_weight!r}")
    if o.antilm_weight and o.beam_size == 1:
        raise ValueError("antilm_weight needs beam search (beam_size > 1)")
    if _number(o, "repetition_penalty") <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {o.repetition_penalty!r}")
    if _number(o, "sampling_temperature") <= 0:
        raise ValueError(f"sampling_temperature must be > 0, got {o.sampling_temperature!r}")
    if not 0 < _number(o, "sampling_topp") <= 1:
        raise ValueError(f"sampling_topp must be in (0, 1], got {o.sampling_topp!r}")
    if o.min_length > o.max_length:
        raise ValueError(
            f"min_length ({o.min_length}) must not exceed max_length ({o.max_length})"
        )
    if o.num_hypotheses > o.beam_size:
        raise ValueError(
            f"num_hypotheses ({o.num_hypotheses}) must not exceed beam_size "
            f"({o.beam_size}): a beam of n keeps n hypotheses"
        )
    if o.beam_size > 1 and o.sampling:
        raise ValueError("sampling (sampling_topk != 1) needs beam_size=1")
    if o.seed is not None and (
        isinstance(o.seed, bool) or not isinstance(o.seed, int) or o.seed < 0
    ):
        raise ValueError(f"seed must be a non-negative integer or None, got {o.seed!r}")
    if not all(isinstance(w, str) for w in o.suppress_words):
        raise ValueError("suppress_words must be strings")
    if o.reply_mode not in REPLY_MODES:
        raise ValueError(f"reply_mode must be one of {', '.join(map(str, REPLY_MODES))}, "
                         f"got {o.reply_mode!r}")
    check_caps(o, CAPS)
    if o.generated_candidates > 1 and not o.sampling:
        raise ValueError("generated_candidates > 1 needs sampling (greedy proposes one "
                         "reply, a beam its num_hypotheses)")
