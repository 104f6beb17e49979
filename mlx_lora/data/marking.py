"""An example's text with the tokens the loss counts marked (`train --show-mask N`): colour on a
terminal, `[[...]]` brackets otherwise, so what is trained can be checked before a run."""

import numpy as np

from mlx_lora.data.examples import Example

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\033[1;32m", "\033[0m"


def marked(tokenizer, example: Example, colour: bool) -> str:
    """The example decoded run by run, each run of trained tokens wrapped in colour or brackets."""
    tokens, mask = np.asarray(example.tokens), np.asarray(example.mask, bool)
    edges = np.flatnonzero(np.diff(np.r_[-1, mask.astype(int), -1]))  # every start of a run, and the end
    opened, closed = (GREEN, RESET) if colour else (OPEN, CLOSE)
    parts = []
    for a, b in zip(edges[:-1], edges[1:]):
        text = tokenizer.decode(tokens[a:b].tolist())
        parts.append(f"{opened}{text}{closed}" if mask[a] else text)
    return "".join(parts)


def mask_report(tokenizer, examples, n: int, colour: bool) -> list[str]:
    """The first `n` examples marked, each with its counts, and the set's counts."""
    lines = []
    for i in range(min(n, len(examples))):
        ex = examples[i]
        trained = int(np.asarray(ex.mask).sum())
        lines += [f"--- row {i + 1}: {trained} of {len(ex.tokens)} tokens trained", marked(tokenizer, ex, colour)]
    total = int(np.asarray(examples.mask[0 : len(examples.mask)]).sum())
    lines.append(f"--- {len(examples)} rows: {total} of {len(examples.mask)} tokens trained")
    return lines
