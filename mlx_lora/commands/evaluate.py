"""Does the adapter help? Loss, perplexity and exact match on a data split, base vs adapter.

Loss counts exactly the tokens training counts (feed.loss_fn over data.py's masks). Exact match
generates greedily, batched by mlx-lm's BatchGenerator (left-padded KV caches; the subclass in
model/batch_generator.py, which takes the argmax of the logits without mlx-lm's log-softmax
first), and compares the final answers: GSM8K's convention, the text after `####`, with numbers
normalised. A vision-language base reads its rows and computes its loss as its training does
(training/vision.py) and generates one row at a time through mlx-vlm, as `generate --image` does.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.nn as nn
from mlx_lm.sample_utils import make_sampler

from mlx_lora import atomic
from mlx_lora.commands.preference_eval import run_preference
from mlx_lora.config import EvalConfig, TrainConfig, data_part
from mlx_lora.data.answers import ANSWER_MARK, answer, final_answer, is_correct
from mlx_lora.data.cache import cache_location
from mlx_lora.data.dataset import DataSplit, Encoding, load_splits
from mlx_lora.data.preference import preference_split
from mlx_lora.data.rows import Row, row_format
from mlx_lora.data.sources import open_source, split_label
from mlx_lora.data.vision import split_images
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.inference.generation import vision_responses
from mlx_lora.model.batch_generator import Generator
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.lora import lora_layers, remove_lora
from mlx_lora.model.vision import template_messages
from mlx_lora.reporting.progress import Bar, on_terminal
from mlx_lora.training.feed import PLAIN
from mlx_lora.training.validation import mean_loss
from mlx_lora.training.vision import VisionFeed, vision_split

# --- what to generate ------------------------------------------------------------------------


@dataclass
class Item:
    """One row to answer: prompt tokens, the reference and how its answer is read."""

    line: int
    prompt: str
    tokens: list[int]
    reference: str
    marked: bool  # the reference holds `####`: compare final answers, else the whole texts
    images: tuple[Path | str, ...] = ()  # a vision-language base's images (paths, data URLs), one per placeholder

    def answer(self, text: str) -> str | None:
        return answer(text, self.marked)

    def cut(self, text: str) -> tuple[str, bool]:
        """(text up to the end of the answer's line, whether the answer is complete).

        A `####` answer ends at the newline after the mark; a single-line reference's answer at the
        first newline after some text. Multi-line references end only at EOS or --max-tokens.
        """
        if self.marked:
            head, mark, tail = text.partition(ANSWER_MARK)
            start = len(head) + len(mark) if mark else None
        else:
            start = None if "\n" in self.reference.strip() else len(text) - len(text.lstrip())
        end = -1 if start is None else text.find("\n", start)
        return (text, False) if end == -1 else (text[:end], True)


def generation_items(rows: list[Row], tokenizer, task: str, vision: bool = False, as_text=None) -> list[Item]:
    """The rows exact match applies to: with `####` in the reference, or every row for exact-match.

    Text rows have no boundary between question and answer; cutting them at `####` would hand the
    model its worked solution, so they get loss and perplexity only. For a vision-language base
    (`vision`), a row's images are placeholders in the prompt, as its chat template writes them
    (`as_text`: the messages as that template reads them, model/vision.py's template_messages).
    """
    items = []
    for where, number, fields in rows:
        row, checked, images = split_images(where, fields) if vision else (fields, fields, [])
        fmt = row_format(where, checked)
        if fmt == "text":
            if task == "exact-match":
                raise UserError(
                    f"{where}: text rows have no prompt to answer; "
                    "use prompt/completion or messages rows for --task exact-match"
                )
            continue
        if "messages" not in row:
            prompt, reference = row["prompt"], row["completion"]
            tokens = tokenizer.encode(prompt)
        else:
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            asked = as_text(row["messages"][:last]) if as_text else row["messages"][:last]
            prompt = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
            reference = row["messages"][last]["content"]
            tokens = tokenizer.encode(prompt, add_special_tokens=False)
        if not tokens:
            raise UserError(f"{where}: the prompt is empty, so there is nothing to answer; give the row a prompt")
        marked = final_answer(reference) is not None
        if task == "exact-match" or (task == "auto" and marked):
            items.append(Item(number, prompt, tokens, reference, marked, tuple(images)))
    return items


# --- generation ------------------------------------------------------------------------------


@contextmanager
def progress(total: int, label: str, log):
    """The shared live bar on a terminal; elsewhere a plain line per tenth, so a log shows it moving."""
    bar = Bar(label, total, log=log, transient=True)
    done, step = 0, max(1, total // 10)

    def advance():
        nonlocal done
        done += 1
        bar.advance()
        if not on_terminal(log) and (done % step == 0 or done == total):
            log(f"{label}: {done}/{total}")

    try:
        yield advance
    finally:
        bar.close()


def generate_answers(
    model: nn.Module, tokenizer, items: list[Item], batch_size: int, max_tokens: int, advance=lambda: None
) -> list[str]:
    """Greedy continuations of every item, `batch_size` at a time, each stopped at EOS, at the end
    of its answer's line (Item.cut) or after `max_tokens`. EOS is not part of the text."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].tokens))  # similar lengths: less padding
    generator = Generator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    uids = generator.insert([items[i].tokens for i in order])
    index = dict(zip(uids, order))
    tokens = {uid: [] for uid in uids}
    texts = [""] * len(items)
    try:
        while responses := generator.next_generated():
            answered = []
            for r in responses:
                if r.finish_reason != "stop":  # "stop" means the token is EOS
                    tokens[r.uid].append(r.token)
                text, complete = items[index[r.uid]].cut(tokenizer.decode(tokens[r.uid]))
                if complete or r.finish_reason is not None:
                    texts[index[r.uid]] = text
                    advance()
                    if r.finish_reason is None:
                        answered.append(r.uid)
            if answered:
                generator.remove(answered)
    finally:
        generator.close()
    return texts


def vision_answers(base, items: list[Item], max_tokens: int, advance=lambda: None) -> list[str]:
    """generate_answers' greedy continuations for a vision-language base, one item at a time through
    mlx-vlm (generate --image's path), each item's images read by the model's own processor."""
    stops, greedy, texts = set(base.tokenizer.eos_token_ids), make_sampler(temp=0.0), []
    for item in items:
        tokens, text = [], ""
        for r in vision_responses(base, item.prompt, list(item.images), max_tokens, greedy):
            if r.finish_reason is not None or r.token in stops:  # mlx-vlm's last response repeats the last token
                break
            tokens.append(r.token)
            text, complete = item.cut(base.tokenizer.decode(tokens))
            if complete:
                break
        texts.append(text)
        advance()
    return texts


# --- one model, then the comparison ----------------------------------------------------------


@dataclass
class Scores:
    loss: float
    perplexity: float
    correct: int = 0
    answered: int = 0  # rows exact match was computed on
    predictions: list[dict] = field(default_factory=list)

    @property
    def exact_match(self) -> float | None:
        return self.correct / self.answered if self.answered else None

    def figures(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "exact_match": self.exact_match,
            "correct": self.correct,
            "answered": self.answered,
        }


def score(base, examples, items: list[Item], cfg: EvalConfig, name: str, log) -> Scores:
    vision = base.processor is not None
    feed = VisionFeed(base.model, base.processor, log) if vision else PLAIN
    loss = mean_loss(base.model, examples, cfg.batch_size, feed=feed, log=log)
    scores = Scores(loss, math.exp(loss))
    if not items:
        return scores
    with progress(len(items), f"generating ({name})", log) as advance:
        if vision:
            texts = vision_answers(base, items, cfg.max_tokens, advance)
        else:
            texts = generate_answers(
                base.model, base.tokenizer, items, cfg.generation_batch_size, cfg.max_tokens, advance
            )
    for item, text in zip(items, texts):
        predicted, expected = item.answer(text), item.answer(item.reference)
        correct = is_correct(predicted, expected)
        scores.correct += correct
        scores.predictions.append({"prediction": text, "predicted_answer": predicted, "correct": correct})
    scores.answered = len(items)
    return scores


def default_adapter(cfg: EvalConfig) -> str | None:
    if cfg.adapter_path is not None:
        return cfg.adapter_path
    return TrainConfig.adapter_path if Path(TrainConfig.adapter_path).is_dir() else None


def split_examples(cfg: EvalConfig, source, base, log) -> DataSplit:
    """The split's examples for the loss, tokenized now or read from the cache, and its rows; a
    vision-language base's as its training encodes them (training/vision.py)."""
    if base.processor is not None:
        return vision_split(source, data_part(cfg), base, cfg.split, cfg.max_seq_length, cfg.max_examples, log)
    tokenizer = base.tokenizer
    encoding = Encoding(cfg.max_seq_length, first=cfg.max_examples)
    cache_dir = cache_location(cfg.data_cache, cfg.cache_data, log)
    splits = (cfg.split,)
    return load_splits(source, data_part(cfg), tokenizer, encoding, splits, cache_dir=cache_dir, log=log)[cfg.split]


def run(cfg: EvalConfig, log=print) -> dict:
    """Evaluate the adapter (and the base, with --compare-base or without an adapter); return every figure."""
    if cfg.output:
        if Path(cfg.output).is_dir():
            raise UserError(f"--output {cfg.output}: is a directory; give a file name such as results.json")
        atomic.check_writable(Path(cfg.output).absolute().parent, "--output")
    adapter_path = default_adapter(cfg)
    if cfg.compare_base and adapter_path is None:
        raise UserError(
            f"--compare-base needs an adapter: pass --adapter-path (./{TrainConfig.adapter_path} does not exist)"
        )
    base = load_for_inference(cfg.model, adapter_path, cfg.compute_dtype)
    use_cpu_kernels(base.model, decoding=True)
    source = open_source(cfg.data, cfg.data_config, log)
    preference = preference_split(source, cfg.split)  # the split's .jsonl file when it holds preference rows
    if base.processor is not None and (cfg.task == "preference" or preference):
        raise UserError(
            f"--task preference on a vision-language model ({base.name}) is not built yet; see docs/vision.md"
        )
    if cfg.task == "preference" or (cfg.task == "auto" and preference):
        return preference_result(cfg, base, adapter_path, source, preference, log)
    if preference:
        raise UserError(
            f"{preference}:1: preference rows (prompt, chosen, rejected); evaluate them with --task preference"
        )
    split = split_examples(cfg, source, base, log)
    rows, examples = split.rows, split.examples
    path = split_label(source, data_part(cfg), cfg.split)  # after: a split that does not exist is refused by name
    vision, as_text = base.processor is not None, partial(template_messages, base.config)
    items = [] if cfg.task == "loss" else generation_items(rows(), base.tokenizer, cfg.task, vision, as_text)
    log(
        f"eval {base.name}{f' + {adapter_path}' if adapter_path else ''} on {path}: {len(examples)} rows for loss, "
        f"{len(items)} for exact match"
    )
    scores = {}
    if adapter_path:
        if cfg.compare_base and not lora_layers(base.model):
            raise UserError(
                f"--adapter-path {adapter_path}: the adapter left no LoRA layers to remove, "
                "so the base cannot be compared"
            )
        scores["adapter"] = score(base, examples, items, cfg, "adapter", log)
        remove_lora(base.model)  # the untouched base layers are back: exactly the base
    if cfg.compare_base or not adapter_path:
        scores["base"] = score(base, examples, items, cfg, "base", log)
    result = report(base.name, adapter_path, path, cfg.task, examples, items, scores)
    if cfg.output:
        atomic.write_json(Path(cfg.output), result)
    return result


def preference_result(cfg: EvalConfig, base, adapter_path, source, path, log) -> dict:
    if path is None:
        raise UserError(
            f"--task preference: --split {cfg.split} of --data {source.name} holds no preference rows "
            "(prompt, chosen, rejected); they are read from a directory of <split>.jsonl files"
        )
    result = run_preference(cfg, base, adapter_path, path, log)
    if cfg.output:
        atomic.write_json(Path(cfg.output), result)
    return result


def report(model: str, adapter_path, path: str, task: str, examples, items: list[Item], scores: dict) -> dict:
    """Every figure of each evaluated model, their difference, and each row's predictions."""
    names = [n for n in ("base", "adapter") if n in scores]
    result = {
        "model": model,
        "adapter_path": adapter_path,
        "data": str(path),
        "task": task,
        "rows": len(examples),
        "loss_tokens": int(sum(ex.mask.sum() for ex in examples)),
        **{n: scores[n].figures() for n in names},
        "predictions": [
            {
                "line": item.line,
                "prompt": item.prompt,
                "reference": item.reference,
                "reference_answer": item.answer(item.reference),
                **{n: scores[n].predictions[i] for n in names},
            }
            for i, item in enumerate(items)
        ],
    }
    if len(names) == 2:
        a, b = result["base"], result["adapter"]
        result["difference"] = {k: None if a[k] is None else b[k] - a[k] for k in ("loss", "perplexity", "exact_match")}
    return result
