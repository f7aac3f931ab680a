"""What a word is wherever words are compared: the words a closed-world model's file lists as its
vocabulary (``sd.checkpoint``) and the words of a mask term checked against them (``masks.presence``).
A word is a run of letters of any script; digits and ``_`` separate words."""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\d_]+")
MAX_WORD = 64  # letters in one vocabulary word


def words(text: str) -> list[str]:
    """The words of ``text``, casefolded: ``'Red star2'`` -> ``['red', 'star']``."""
    return _WORD.findall(text.casefold())


def is_vocabulary_word(text: object) -> bool:
    """Whether ``text`` is one casefolded word of at most MAX_WORD letters."""
    return isinstance(text, str) and len(text) <= MAX_WORD and _WORD.fullmatch(text) is not None \
        and text == text.casefold()
