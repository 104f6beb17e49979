"""Final answers as GSM8K writes them, the text after `####`, and when two agree: what eval's exact
match and GRPO's exact-match reward both read."""

import re
from decimal import Decimal

ANSWER_MARK = "####"
# A number as people write answers: optional sign and currency, thousands commas, decimals, percent.
NUMBER = re.compile(r"([-+]?)[$€£]?([-+]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?!\d)%?")


def final_answer(text: str) -> str | None:
    """What follows the first `####` on its line (GSM8K's convention); None without a `####`."""
    _, mark, tail = text.partition(ANSWER_MARK)
    return tail.split("\n", 1)[0].strip() if mark else None


def as_number(text: str) -> str | None:
    """`$1,072.50` -> `1072.5`, `72.0` -> `72`, `-$3` -> `-3`; None unless the whole text is a number."""
    m = NUMBER.fullmatch(text)
    if m is None:
        return None
    value = Decimal(m[3].replace(",", "")) * (-1 if (m[1] + m[2]).count("-") % 2 else 1)
    return "0" if value == 0 else format(value.normalize(), "f")


def normalize(answer: str) -> str:
    """Numbers in one canonical form; text with whitespace collapsed, case folded, no final period."""
    text = " ".join(answer.split()).rstrip(".").strip()
    number = as_number(text)
    return number if number is not None else text.casefold()


def is_correct(predicted: str | None, reference: str) -> bool:
    """A numeric reference is matched by the number the prediction starts with (`72 apples.`)."""
    if predicted is None:
        return False
    expected = normalize(reference)
    if as_number(expected) is not None:
        m = NUMBER.match(predicted.strip())
        return m is not None and as_number(m[0].rstrip(".")) == expected
    return normalize(predicted) == expected


def answer(text: str, marked: bool) -> str | None:
    """The answer a text gives: its final answer where the reference is `####`-marked, else the whole text."""
    return final_answer(text) if marked else text.strip()


def agrees(completion: str, reference: str) -> bool:
    """Whether a completion gives the reference's answer, as eval's exact match scores it."""
    marked = final_answer(reference) is not None
    return is_correct(answer(completion, marked), answer(reference, marked))
