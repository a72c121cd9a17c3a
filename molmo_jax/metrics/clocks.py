"""Clock reading accuracy ("What time is being shown?").

Times are read from digital forms ("10:15", "10.15", "10:15:30", "3:45 PM"), "o'clock" forms,
spoken forms ("quarter past ten", "half past 3", "twenty to eleven", "5 minutes after 2"), "ten
fifteen" / "ten oh five", and "noon" / "midnight".

Tolerance (documented choice): an analog face does not show AM/PM, so hours are compared modulo 12;
by default hour and minute must both match exactly (seconds are ignored). `minute_tolerance`
allows an absolute error in minutes measured around the 12-hour dial (so 11:59 vs 12:01 is 2).
"""
from __future__ import annotations

import re

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50}
_WORD = {w: i for i, w in enumerate(_UNITS)}
# A number 0..59 as digits or words ("7", "seven", "twenty-five", "twenty five").
_NUM = (r"(\d{1,2}|(?:twenty|thirty|forty|fifty)(?:[- ](?:one|two|three|four|five|six|seven|eight|nine))?|"
        + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")")
_HOUR = r"(\d{1,2}|" + "|".join(sorted(_UNITS[1:13], key=len, reverse=True)) + r")"

_DIGITAL = re.compile(r"\b(\d{1,2})\s*[:.]\s*(\d{2})(?:\s*[:.]\s*\d{2})?(?!\d)")
_OCLOCK = re.compile(rf"\b{_HOUR}\s*o'?\s*clock\b")
_QUARTER_HALF = re.compile(rf"\b(?:a\s+)?(quarter|half)\s+(past|after|to|before|of)\s+{_HOUR}\b")
_MINUTES_PAST = re.compile(rf"\b{_NUM}\s+(?:minutes?\s+)?(past|after|to|before|of)\s+{_HOUR}\b")
_SPOKEN = re.compile(rf"\b{_HOUR}\s+(?:oh[- ]|o[- ])?{_NUM}\b")


def _number(token: str) -> int:
    token = token.strip()
    if token.isdigit():
        return int(token)
    if token in _WORD:
        return _WORD[token]
    tens, _, unit = token.replace("-", " ").partition(" ")
    return _TENS[tens] + (_WORD[unit] if unit else 0)


def _valid(hour: int, minute: int) -> tuple[int, int] | None:
    return (hour % 12, minute) if 0 <= hour <= 24 and 0 <= minute < 60 else None


def parse_clock_time(text: str) -> tuple[int, int] | None:
    """(hour modulo 12, minute) written in `text`, or None when no time can be read."""
    t = " ".join(str(text or "").lower().split())
    if m := _DIGITAL.search(t):
        return _valid(int(m.group(1)), int(m.group(2)))
    if m := _QUARTER_HALF.search(t):
        minutes = 15 if m.group(1) == "quarter" else 30
        hour = _number(m.group(3))
        if m.group(2) in ("to", "before", "of"):
            return _valid(hour - 1, 60 - minutes)
        return _valid(hour, minutes)
    if m := _MINUTES_PAST.search(t):
        minutes, hour = _number(m.group(1)), _number(m.group(3))
        if m.group(2) in ("to", "before", "of"):
            return _valid(hour - 1, 60 - minutes) if 0 < minutes < 60 else None
        return _valid(hour, minutes)
    if m := _OCLOCK.search(t):
        return _valid(_number(m.group(1)), 0)
    if re.search(r"\b(noon|midnight)\b", t):
        return (0, 0)
    if m := _SPOKEN.search(t):
        return _valid(_number(m.group(1)), _number(m.group(2)))
    return None


def clock_accuracy(prediction: str, answer: str | tuple[int, int], *, minute_tolerance: int = 0) -> float:
    """1 if the predicted time matches the answer (hours modulo 12) within `minute_tolerance`."""
    truth = tuple(answer) if isinstance(answer, (tuple, list)) else parse_clock_time(answer)
    if truth is None:
        raise ValueError(f"cannot read a time from the reference answer {answer!r}")
    truth = (int(truth[0]) % 12, int(truth[1]))
    pred = parse_clock_time(prediction)
    if pred is None:
        return 0.0
    diff = abs((pred[0] * 60 + pred[1]) - (truth[0] * 60 + truth[1])) % 720
    return float(min(diff, 720 - diff) <= minute_tolerance)
