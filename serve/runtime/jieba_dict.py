"""jieba's dictionary, compact: the same lookups from memory-mapped arrays.

jieba keeps its dictionary as a dict of about 580k words and prefixes (``FREQ``: word ->
frequency, a prefix -> 0), some 70 MB of Python objects in every server process, built in
about a second at start. ``CompactFreq`` answers the only lookups jieba makes of it
(``in``, ``[]``, ``get``) from arrays: the words' 63-bit hashes (sorted), their
frequencies and their UTF-8 bytes (each hit is checked against the word itself, so the
answers, and therefore the segmentation, are exactly jieba's). Recent answers are kept in
a small dict, which keeps the common words as fast as before.

The arrays are built once per jieba dictionary, in a child process (whose peak memory is
not the server's), into a cache folder (``$XDG_CACHE_HOME/xiaox``, else ``~/.cache/xiaox``,
else the temporary folder), and memory-mapped after. Anything failing there falls back to
jieba's own dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FORMAT = 1
HOT_WORDS = 50_000  # answers remembered (a few MB): chat messages reuse their words
_MISSING = object()
log = logging.getLogger(__name__)


def _hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class CompactFreq:
    """A read-only stand-in for jieba's ``FREQ`` dict (see the module docstring)."""

    def __init__(self, folder: Path):
        self.total = int(json.loads((folder / "meta.json").read_text())["total"])
        self._hashes = np.load(folder / "hashes.npy", mmap_mode="r")
        self._freqs = np.load(folder / "freqs.npy", mmap_mode="r")
        self._offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        with open(folder / "words.bin", "rb") as f:
            self._words = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._hot: dict[str, int | None] = {}

    def __len__(self) -> int:
        return len(self._hashes)

    def _find(self, word: str) -> int | None:
        key = word.encode("utf-8")
        h = _hash(key)
        i = int(np.searchsorted(self._hashes, h))
        while i < len(self._hashes) and int(self._hashes[i]) == h:
            if self._words[int(self._offsets[i]) : int(self._offsets[i + 1])] == key:
                return int(self._freqs[i])
            i += 1
        return None

    def get(self, word: str, default=None):
        value = self._hot.get(word, _MISSING)
        if value is _MISSING:
            value = self._find(word)
            if len(self._hot) >= HOT_WORDS:
                self._hot.clear()
            self._hot[word] = value
        return default if value is None else value

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and self.get(word) is not None

    def __getitem__(self, word: str) -> int:
        value = self.get(word)
        if value is None:
            raise KeyError(word)
        return value


def build(dictionary: Path, folder: Path) -> None:
    """The arrays of ``dictionary`` (jieba's format) into ``folder``, written whole or
    not at all."""
    import jieba

    with open(dictionary, "rb") as f:
        freq, total = jieba.Tokenizer.gen_pfdict(f)
    keys = [w.encode("utf-8") for w in freq]
    hashes = np.array([_hash(k) for k in keys], np.int64)
    order = np.argsort(hashes, kind="stable")
    values = np.fromiter(freq.values(), np.int64, len(keys))
    lengths = np.array([len(keys[i]) for i in order], np.int64)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    np.save(partial / "hashes.npy", hashes[order])
    np.save(partial / "freqs.npy", values[order])
    np.save(partial / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    (partial / "words.bin").write_bytes(b"".join(keys[i] for i in order))
    (partial / "meta.json").write_text(json.dumps({"total": total, "format": FORMAT}))
    try:
        partial.rename(folder)
    except OSError:  # another process was first: theirs is the same
        pass


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    home = (Path(base) if base else Path.home() / ".cache") / "xiaox"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "xiaox-cache"


def load(dictionary: Path) -> CompactFreq | None:
    """The compact dictionary of ``dictionary``, built in a child process the first time;
    None when that fails (jieba's own dict is used then)."""
    try:
        digest = hashlib.sha256(dictionary.read_bytes()).hexdigest()[:16]
        folder = _cache_root() / f"jieba-{digest}-v{FORMAT}"
        if not (folder / "meta.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            root = str(Path(__file__).resolve().parents[2])  # where ``serve`` is
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
            subprocess.run([sys.executable, "-m", "serve.runtime.jieba_dict", str(dictionary),
                            str(folder)], check=True, timeout=300, capture_output=True,
                           env=env, cwd=root)
        return CompactFreq(folder)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        log.warning("jieba's compact dictionary is unavailable (%s): using jieba's own", e)
        return None


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
