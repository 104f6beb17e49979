"""Results and run facts as plain text for people: the table `eval` prints (and the model card
repeats), and block indices as spans (`info`, the card)."""


def table(result: dict) -> str:
    """Base and/or adapter side by side, with the change the adapter makes."""
    if result["task"] == "preference":
        return preference_table(result)
    names = [n for n in ("base", "adapter") if n in result]
    header = [""] + names + (["change"] if "difference" in result else [])
    rows = [header]
    for key, label in (("loss", "loss"), ("perplexity", "perplexity"), ("exact_match", "exact match")):
        if result[names[0]][key] is None:
            continue
        row = [label] + [f"{result[n][key]:.3f}" for n in names]
        if key == "exact_match":
            row[1:] = [f"{cell} ({result[n]['correct']}/{result[n]['answered']})" for cell, n in zip(row[1:], names)]
        if "difference" in result:
            row.append(f"{result['difference'][key]:+.3f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )


def preference_table(result: dict) -> str:
    names = [n for n in ("base", "adapter") if n in result]
    rows = [[""] + names + (["change"] if "difference" in result else [])]
    for key, label in (("accuracy", "preference accuracy"), ("margin", "log-prob margin")):
        row = [label] + [f"{result[n][key]:.3f}" for n in names]
        if "difference" in result:
            row.append(f"{result['difference'][key]:+.3f}")
        rows.append(row)
    if "adapter" in result:
        a = result["adapter"]
        for key, label in (("reward_accuracy", "reward accuracy"), ("reward_margin", "reward margin")):
            rows.append(
                [label]
                + ["" for n in names if n == "base"]
                + [f"{a[key]:.3f}"]
                + ([""] if "difference" in result else [])
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )


def spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs, start = [], None
    for i, n in enumerate(indices):
        start = n if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            runs.append(f"{start}-{n}" if n > start else f"{n}")
            start = None
    return ", ".join(runs)
