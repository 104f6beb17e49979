import re

import pytest

from mlx_lora.data.rows import Row
from mlx_lora.errors import UserError
from mlx_lora.training import rewards
from mlx_lora.training.rewards import Task, make_rewards, score, score_all

TASK = Task("data/train.jsonl:3", "Q: 2 + 5?\nA:", " 2 + 5 = 7. #### 7", {"prompt": "Q: 2 + 5?\nA:", "id": 3})


@pytest.mark.parametrize(
    ("completion", "value"),
    [(" 2 + 5 = 7. #### 7", 1.0), (" so #### 7.0\nmore", 1.0), (" #### 8", 0.0), (" 7", 0.0), ("", 0.0)],
)
def test_exact_match_reads_the_answer_after_the_mark(completion, value):
    assert score(rewards.Reward("exact-match", rewards.exact_match), TASK, completion) == value


def test_exact_match_without_a_mark_compares_whole_answers():
    task = Task("x:1", "Capital of France?", " Paris.", {})
    assert rewards.exact_match(task, "paris") == 1.0
    assert rewards.exact_match(task, "Paris is it") == 0.0


def test_format_reward_searches_the_regex():
    fmt = rewards.format_reward(re.compile(r"#### -?\d"))
    assert fmt(TASK, "x = 3 #### 3") == 1.0
    assert fmt(TASK, "x = 3") == 0.0


def test_python_reward_gets_prompt_completion_and_row(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def length(prompt, completion, row):\n    return len(completion) + row['id'] + len(prompt) * 0\n")
    made = make_rewards(["exact-match", f"python:{f}:length", "format"], r"####")
    assert [r.name for r in made] == ["exact-match", f"python:{f}:length", "format"]
    assert score_all(made, TASK, "ab #### 7") == [1.0, 12.0, 1.0]


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (None, "python:nofile.py:f", "no file nofile.py"),
        ("def g(p, c, r):\n    return 1\n", "python:{f}:f", "has no function f"),
        ("raise ValueError('bad')\n", "python:{f}:f", "failed to load: ValueError: bad"),
        (None, "python:f", "write python:path/to/file.py:function"),
    ],
)
def test_python_reward_refuses_a_wrong_spec_in_one_line(tmp_path, source, spec, message):
    f = tmp_path / "r.py"
    if source:
        f.write_text(source)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        make_rewards([spec.format(f=f)], "")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("return 1 / 0", "data/train.jsonl:3: reward python:{f}:r raised ZeroDivisionError: division by zero"),
        ("return 'high'", "data/train.jsonl:3: reward python:{f}:r returned 'high'; return a finite number"),
        ("return float('nan')", "returned nan"),
    ],
)
def test_a_failing_user_reward_is_one_line_naming_the_row(tmp_path, body, message):
    f = tmp_path / "r.py"
    f.write_text(f"def r(prompt, completion, row):\n    {body}\n")
    (reward,) = make_rewards([f"python:{f}:r"], "")
    with pytest.raises(UserError, match=re.escape(message.format(f=f))) as e:
        score(reward, TASK, "x")
    assert "\n" not in str(e.value)


class Tokenizer:
    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_task_of_a_completion_row_and_a_conversation():
    t, tokens = rewards.task(Row("a:1", 1, {"prompt": "Q?", "completion": " #### 4"}), Tokenizer())
    assert (t.prompt, t.reference, tokens) == ("Q?", " #### 4", [ord("Q"), ord("?")])
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "#### 2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "#### 4"},
    ]
    t, _ = rewards.task(Row("a:2", 2, {"messages": messages}), Tokenizer())
    assert t.prompt == "<user>1+1?<assistant>#### 2<user>2+2?<assistant>"
    assert t.reference == "#### 4"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": "hello"}, "a:1: --objective grpo needs prompt/completion or messages rows, not text rows"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "a:1: 'messages' has no assistant turn"),
        ({"prompt": "", "completion": "x"}, "a:1: the prompt is empty"),
    ],
)
def test_task_refuses_rows_without_a_prompt_and_answer(fields, message):
    with pytest.raises(UserError, match=re.escape(message)):
        rewards.task(Row("a:1", 1, fields), Tokenizer())
