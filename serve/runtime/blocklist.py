"""The blocklist: words 小X must neither learn nor say.

Training drops pairs containing a term and renames other bots (``小通 -> 小X``);
serving suppresses every token containing a term or a renamed name; evaluation counts
the replies that contain one. One file format, one implementation, here.

File format: one term a line; ``term -> replacement`` for a replacement; ``#`` comments.
Matching is on normalised, lower-cased text, so 小黃雞 matches 小黄鸡 and SB matches sb.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from serve.runtime.tokenizer import normalize

BLOCKLIST_FILE = "blocklist.txt"


class BlocklistError(ValueError):
    """An unreadable or malformed blocklist file (the message names file and line)."""


@dataclass
class Blocklist:
    terms: list[str] = field(default_factory=list)
    replacements: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Blocklist:
        path = Path(path)
        if not path.is_file():
            raise BlocklistError(f"blocklist file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise BlocklistError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        blocklist = cls()
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if "->" in line:
                term, _, replacement = (part.strip() for part in line.partition("->"))
                if not term:
                    raise BlocklistError(f"{path}:{number}: a replacement needs a term before '->'")
                blocklist.replacements[normalize(term).lower()] = normalize(replacement)
            else:
                blocklist.terms.append(normalize(line).lower())
        # Longest first, so that 小黄鸡 is replaced before a shorter overlapping name.
        blocklist.replacements = dict(
            sorted(blocklist.replacements.items(), key=lambda kv: -len(kv[0]))
        )
        return blocklist

    @property
    def words(self) -> tuple[str, ...]:
        """Everything 小X must not say: the terms and the replaced names."""
        return tuple(sorted({*self.terms, *self.replacements}))

    def replace(self, text: str) -> str:
        for term, replacement in self.replacements.items():
            if term in text.lower():
                text = re.sub(re.escape(term), replacement, text, flags=re.IGNORECASE)
        return text

    def blocks(self, text: str) -> bool:
        lowered = text.lower()
        return any(term in lowered for term in self.terms)

    def hits(self, text: str) -> list[str]:
        """The words of ``words`` that ``text`` contains."""
        lowered = normalize(text).lower()
        return [word for word in self.words if word in lowered]
