"""Adaptation corpora: one text per row, optionally paired with its own image(s).

Accepted rows (``.jsonl`` / ``.json`` files, one JSON object per line)::

    {"text": "a red double-decker bus"}
    {"text": "The color of this bus is red.", "image": "train/bus/0001.jpg"}
    {"text": "two dogs on a beach", "images": ["a.jpg", "b.jpg"]}

or plain text files (one text per line, no images). Image paths are relative to ``image_root`` when it
is given, else to the corpus file's folder; a path that resolves outside that root, or a missing file,
is an error naming the file and line. Every text must be a non-empty string: ``{"text": null}``,
``12345`` or ``["a"]`` are refused (or counted and skipped with ``skip_bad_rows``), never trained as
"None" / "12345" / "['a']".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError

IMAGE_KEYS = ("image", "images")


@dataclass(frozen=True)
class CorpusRow:
    """One adaptation example: its text and the absolute paths of the images it is paired with (may be empty)."""

    text: str
    images: tuple[str, ...] = ()


@dataclass
class Corpus:
    """Rows read from one or more files, plus how many malformed rows were skipped."""

    rows: list[CorpusRow]
    skipped: int = 0

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]

    @property
    def paired(self) -> bool:
        """True when at least one row names its own image(s)."""
        return any(r.images for r in self.rows)


class _BadRow(Exception):
    """A malformed row (message without location); turned into an InputError or a skip."""


def _row_text(obj) -> str:
    if not isinstance(obj, dict):
        raise _BadRow(f"expected a JSON object with a 'text' field, got {type(obj).__name__}")
    if "text" not in obj:
        raise _BadRow("the object has no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise _BadRow(f"'text' must be a string, got {type(text).__name__} ({json.dumps(text)[:40]})")
    text = " ".join(text.split())
    if not text:
        raise _BadRow("'text' is empty")
    return text


def _row_images(obj: dict, root: Path) -> tuple[str, ...]:
    names = [k for k in IMAGE_KEYS if k in obj]
    if not names:
        return ()
    if len(names) > 1:
        raise _BadRow("give either 'image' or 'images', not both")
    value = obj[names[0]]
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        raise _BadRow(f"'{names[0]}' must be a non-empty path string or a list of them")
    out = []
    root_real = Path(os.path.realpath(root))
    for p in paths:
        full = Path(os.path.realpath(root / p))
        if full != root_real and root_real not in full.parents:
            raise _BadRow(f"image path {p!r} resolves outside the image root {root_real}")
        if not full.is_file():
            raise _BadRow(f"image {p!r} not found (looked for {full})")
        out.append(str(full))
    return tuple(out)


def read_corpus_rows(files, limit: int | None = None, image_root: str | os.PathLike | None = None,
                     skip_bad_rows: bool = False) -> Corpus:
    """Read and validate corpus files (see the module docstring) -> ``Corpus``."""
    rows: list[CorpusRow] = []
    skipped = 0
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise InputError(f"corpus file {path} not found", hint="pass an existing .jsonl or .txt file to --corpus")
        root = Path(image_root) if image_root is not None else path.resolve().parent
        is_json = path.suffix in (".jsonl", ".json")
        try:
            fh = open(path, encoding="utf-8")
            lines = list(fh)
            fh.close()
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text (byte {exc.start} of the file)",
                             hint="convert the corpus to UTF-8, e.g. iconv -t utf-8") from None
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                if is_json:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise _BadRow(f"not valid JSON ({exc.msg})") from None
                    row = CorpusRow(_row_text(obj), _row_images(obj, root))
                else:
                    row = CorpusRow(" ".join(line.split()))
            except _BadRow as bad:
                if skip_bad_rows:
                    skipped += 1
                    continue
                raise InputError(f"{path}:{lineno}: {bad}",
                                 hint="fix or remove that line, or pass --skip-bad-rows to count and skip such rows"
                                 ) from None
            rows.append(row)
            if limit and len(rows) >= limit:
                return Corpus(rows, skipped)
    if not rows:
        raise InputError(f"the corpus {', '.join(map(str, files))} has no texts"
                         + (f" ({skipped} malformed rows skipped)" if skipped else ""),
                         hint="each line must be {\"text\": \"...\"} (JSONL) or one text (plain .txt)")
    return Corpus(rows, skipped)


__all__ = ["CorpusRow", "Corpus", "read_corpus_rows"]
