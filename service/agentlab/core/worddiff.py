"""A word-level diff of two texts, for comparing runs' outputs.

Texts are cut into runs of non-whitespace and runs of whitespace, so the
diff reproduces both texts exactly: joining the ``equal`` and ``delete``
pieces gives the first, the ``equal`` and ``insert`` pieces the second.
difflib's matcher takes O(n²) time in words at worst, so texts longer than
MAX_WORDS are not matched word by word: the diff then says "all of one
replaced by all of the other" (or "equal"), still exact.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

__all__ = ["MAX_WORDS", "DiffKind", "word_diff"]

DiffKind = Literal["equal", "insert", "delete"]

_WORDS = re.compile(r"\s+|\S+")

# Words and whitespace runs per text: about 10,000 words, which difflib
# matches in well under a second in the usual case.
MAX_WORDS = 20_000


def word_diff(before: str, after: str) -> list[tuple[DiffKind, str]]:
    """(kind, text) pieces turning ``before`` into ``after``, neighbours of
    one kind merged; a replaced run is its delete, then its insert."""
    old = _WORDS.findall(before)
    new = _WORDS.findall(after)
    if len(old) > MAX_WORDS or len(new) > MAX_WORDS:
        if before == after:
            return [("equal", before)] if before else []
        replaced: list[tuple[DiffKind, str]] = [("delete", before), ("insert", after)]
        return [(kind, text) for kind, text in replaced if text]
    # autojunk off: it would treat frequent words (spaces, "the") as noise
    # in texts over 200 words and report them as changed.
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    pieces: list[tuple[DiffKind, str]] = []

    def add(kind: DiffKind, words: list[str]) -> None:
        text = "".join(words)
        if not text:
            return
        if pieces and pieces[-1][0] == kind:
            pieces[-1] = (kind, pieces[-1][1] + text)
        else:
            pieces.append((kind, text))

    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            add("equal", old[i1:i2])
        else:  # replace, delete or insert
            add("delete", old[i1:i2])
            add("insert", new[j1:j2])
    return pieces
