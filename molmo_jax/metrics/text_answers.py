"""Short-answer metrics: VQA soft accuracy, ANLS, ChartQA relaxed accuracy, exact match and
multiple-choice option accuracy, plus the prediction post-processing of docs/architecture.md#metrics.

Every scorer takes one prediction and its list of reference answers and returns a float in [0, 1];
averaging over examples is left to the caller (see tools/eval.py).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

# ----------------------------------------------------------------------------------------------
# Post-processing (15.2)

_ANSWER_PREFIX = "Answer:"


def postprocess_answer(text: str) -> str:
    """Strip; keep what follows the last "Answer:"; else for multi-line text take the most frequent
    line (whitespace collapsed, ties to the earliest); else collapse whitespace."""
    t = (text or "").strip()
    if _ANSWER_PREFIX in t:
        return " ".join(t.rsplit(_ANSWER_PREFIX, 1)[1].split())
    lines = [" ".join(line.split()) for line in t.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1:
        counts = Counter(lines)
        best = max(counts.values())
        return next(line for line in lines if counts[line] == best)
    return " ".join(t.split())


# ----------------------------------------------------------------------------------------------
# Edit distance

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ----------------------------------------------------------------------------------------------
# VQA v2 answer normalisation and soft accuracy

# Punctuation handled by the standard VQA evaluation; "." is treated separately (decimal points)
# and "'" is kept (contractions).
_VQA_PUNCT = ";/[]\"{}()=+\\_->@<`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions answers often write without the apostrophe. Words that are also ordinary words
# without it ("its", "were", "well", "ill", "shed", "lets", "hell", ...) are left out on purpose.
_CONTRACTIONS = [
    "ain't", "aren't", "can't", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hasn't", "haven't", "he'd", "he's", "he'll", "how'd", "how's", "i'd", "i'm", "i've", "isn't",
    "it'd", "it'll", "let's", "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't",
    "o'clock", "shan't", "she's", "should've", "shouldn't", "that's", "there's", "there're",
    "they'd", "they'll", "they're", "they've", "wasn't", "we've", "weren't", "what's", "what're",
    "when's", "where's", "where'd", "who's", "who'd", "who'll", "why's", "won't", "would've",
    "wouldn't", "y'all", "you'd", "you'll", "you're", "you've"]
_AMBIGUOUS = {"lets", "hell", "shell", "ill", "well", "were", "its", "wed", "shed", "id"}
_CONTRACTION_FIX = {c.replace("'", ""): c for c in _CONTRACTIONS if c.replace("'", "") not in _AMBIGUOUS}


def normalize_vqa_answer(text: str) -> str:
    """The standard VQA answer normalisation.

    Punctuation from _VQA_PUNCT is deleted when it touches a space or the answer has a digit
    grouping comma ("1,000"), else replaced by a space; a "." not followed by a digit is deleted
    (that is what the standard evaluation's period rule does in practice); lower-case; number words
    zero..ten and "none" become digits; articles a/an/the are dropped; apostrophe-less
    contractions ("dont") get their apostrophe back.
    """
    t = (text or "").replace("\n", " ").replace("\t", " ").strip()
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(t) is not None
    for p in _VQA_PUNCT:
        if p not in t:
            continue
        if (p + " ") in t or (" " + p) in t or has_digit_comma:
            t = t.replace(p, "")
        else:
            t = t.replace(p, " ")
    t = _PERIOD_NOT_BEFORE_DIGIT.sub("", t)
    words = []
    for w in t.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTION_FIX.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize: bool = True) -> float:
    """min(#references equal to the prediction / 3, 1) (no 10-choose-9 averaging, as the original).

    normalize=False compares lower-cased stripped strings (the A-OKVQA direct-answer variant).
    """
    if normalize:
        pred = normalize_vqa_answer(prediction)
        refs = [normalize_vqa_answer(a) for a in answers]
    else:
        pred = (prediction or "").strip().lower()
        refs = [a.strip().lower() for a in answers]
    return min(sum(r == pred for r in refs) / 3.0, 1.0)


# ----------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA, ST-VQA)

def _anls_norm(s: str) -> str:
    return " ".join((s or "").strip().lower().split())


def anls(prediction: str, answers: Sequence[str], *, threshold: float = 0.5) -> float:
    """Max over references of 1 - NLD when NLD < threshold, else 0;
    NLD = edit_distance / max(len) on lower-cased, whitespace-collapsed strings."""
    pred = _anls_norm(prediction)
    best = 0.0
    for ref in answers:
        ref = _anls_norm(ref)
        longest = max(len(pred), len(ref))
        nld = edit_distance(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nld if nld < threshold else 0.0)
    return best


# ----------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy

def _relaxed_float(text: str) -> float | None:
    t = text.strip()
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100.0
        return float(t)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], *, tolerance: float = 0.05) -> float:
    """1 if some reference matches: numbers (a trailing % divides by 100) within `tolerance`
    relative error of a non-zero reference, otherwise case-insensitive exact match."""
    pred = (prediction or "").strip()
    pred_num = _relaxed_float(pred)
    for ref in answers:
        ref = ref.strip()
        ref_num = _relaxed_float(ref)
        if pred_num is not None and ref_num:  # a zero reference falls back to string equality
            if abs(pred_num - ref_num) / abs(ref_num) <= tolerance:
                return 1.0
        elif pred.lower() == ref.lower():
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------------------------
# Exact match and multiple choice (AI2D, ScienceQA, A-OKVQA MC)

def _plain(s: str) -> str:
    """Lower-case, collapse whitespace, drop a trailing period."""
    t = " ".join(str(s).strip().lower().split())
    return t[:-1].rstrip() if t.endswith(".") else t


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the prediction equals a reference (case, surrounding space and a final "." ignored)."""
    pred = _plain(prediction or "")
    return float(any(pred == _plain(a) for a in answers))


_LETTER = re.compile(r"\(?([a-z])\)?(?:[.:)]\s*.*)?", re.DOTALL)


def option_letter(index: int) -> str:
    return chr(ord("A") + index)


def select_option(prediction: str, options: Sequence[str]) -> int | None:
    """The option a free-form prediction picks (None when there are no options).

    In order: exact match of the option text; an option letter ("B", "(B)", "B.", "B: text");
    the only option whose text the prediction contains (or the only one containing the
    prediction); else the option at minimum edit distance (ties to the first).
    """
    if not options:
        return None
    pred = _plain(prediction or "")
    opts = [_plain(o) for o in options]
    for i, o in enumerate(opts):
        if pred == o:
            return i
    m = _LETTER.fullmatch(pred)
    if m and ord(m.group(1)) - ord("a") < len(opts):
        return ord(m.group(1)) - ord("a")
    if pred:
        contained = [i for i, o in enumerate(opts) if o and o in pred]
        if len(contained) == 1:
            return contained[0]
        containing = [i for i, o in enumerate(opts) if pred in o]
        if len(containing) == 1:
            return containing[0]
    distances = [edit_distance(pred, o) for o in opts]
    return distances.index(min(distances))


def multiple_choice_accuracy(prediction: str, answers: Sequence[str | int],
                             options: Sequence[str] | None = None) -> float:
    """With options: 1 if the selected option is a correct one; each answer may be the option text,
    its letter ("B") or its 0-based index. Without options: exact_match."""
    if not options:
        return exact_match(prediction, [str(a) for a in answers])
    chosen = select_option(prediction, options)
    for a in answers:
        if isinstance(a, int) and not isinstance(a, bool):
            correct = a
        elif _plain(a) in [_plain(o) for o in options]:
            correct = [_plain(o) for o in options].index(_plain(a))
        elif len(_plain(a)) == 1 and "a" <= _plain(a) <= "z":
            correct = ord(_plain(a)) - ord("a")
        else:
            continue
        if chosen == correct:
            return 1.0
    return 0.0
