"""Generated text → a comparable answer, and whether it is right: pure string rules, no torch.

Why its own module: the dataset loader, the result loaders and the dashboard check labels and answers without
loading a model; these rules lived beside the adapters and pulled torch into every such import.
"""

from __future__ import annotations

import re
import string
from typing import Literal

NormalizationMode = Literal["strict", "lenient"]
YES_WORDS = {"yes", "yeah", "yep", "true", "correct"}
NO_WORDS = {"no", "nope", "false", "not", "none"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

def normalize_answer(text: str, mode: NormalizationMode = "lenient") -> str:
    """Map generated text to a comparable answer.

    strict: lower-cased, stripped of surrounding whitespace/punctuation; "yes"/"no" only when the whole answer is
    exactly that word (the research code's exact match). lenient: the first word decides ("Yes, there is..." -> yes).
    """
    cleaned = _PUNCT.sub(" ", text.lower()).split()
    if not cleaned:
        return ""
    if mode == "strict":
        return " ".join(cleaned)
    if mode != "lenient":
        raise ValueError(f"unknown normalisation mode {mode!r}; expected 'strict' or 'lenient'")
    first = cleaned[0]
    if first in YES_WORDS:
        return "yes"
    negated = any(w in NO_WORDS for w in cleaned[1:4]) or "n't" in text.lower()[:20]
    if first in NO_WORDS or (first in {"there", "it"} and negated):
        return "no"
    if first in {"there", "it"} and len(cleaned) > 1 and cleaned[1] in {"is", "are"}:
        return "yes"
    if first.isdigit() and int(first) < len(NUMBER_WORDS):
        return NUMBER_WORDS[int(first)]
    return first


def is_correct(answer: str, label: str) -> bool:
    """A normalised answer is right when it equals the leniently normalised label (empty answers never are)."""
    return bool(answer) and answer == normalize_answer(label, "lenient")
