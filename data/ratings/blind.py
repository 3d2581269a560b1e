"""Blind rating of a sheet written by ``python -m serve evaluate --sheet``.

    python data/ratings/blind.py make SHEET BLIND       # BLIND: id<TAB>prompt<TAB>reply
    python data/ratings/blind.py merge SHEET RATED OUT  # OUT: SHEET with its marks filled

Each distinct (prompt, reply) pair of the sheet appears once in BLIND, shuffled (seed 7),
without the mode that produced it, so that the rater cannot favour a mode. RATED has one
line per BLIND id: id<TAB>sensible<TAB>specific (1 or 0).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path


def read_sheet(path: Path) -> tuple[str, list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0], [line.split("\t") for line in lines[1:]]


def blind_pairs(sheet: list[list[str]]) -> list[tuple[str, str]]:
    pairs = sorted({(row[0], row[2]) for row in sheet})
    random.Random(7).shuffle(pairs)
    return pairs


def make(sheet_path: Path, blind_path: Path) -> None:
    _, sheet = read_sheet(sheet_path)
    lines = [f"{i}\t{prompt}\t{reply}\n" for i, (prompt, reply) in enumerate(blind_pairs(sheet))]
    blind_path.write_text("".join(lines), encoding="utf-8")


def merge(sheet_path: Path, rated_path: Path, out_path: Path) -> None:
    header, sheet = read_sheet(sheet_path)
    pairs = blind_pairs(sheet)
    marks = {}
    for line in rated_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            i, sensible, specific = line.split("\t")[:3]
            marks[pairs[int(i)]] = (sensible, specific)
    rows = [[row[0], row[1], row[2], *marks[(row[0], row[2])]] for row in sheet]
    out_path.write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in rows),
                        encoding="utf-8")


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    {"make": make, "merge": merge}[command](*map(Path, paths))
