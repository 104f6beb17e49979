"""Our GRPO (`mlx-lora train --objective grpo`) against mlx-lm-lora's (`train_grpo`, 5.10.2) on the
same model, prompts and settings: wall time, seconds per step (rollout and update apart), peak memory.

    python bench/grpo_speed.py                                   # 10 steps, G=4, 64 tokens
    python bench/grpo_speed.py --steps 20 --group-size 8 --max-completion-tokens 128 --rounds 3

The model is the real SmolLM2-135M-Instruct: the GGUF of the tests de-quantized to an fp32 Hugging
Face directory by train_speed.build_model, read by both. Prompts are the bundled GSM8K-style
problems (data/train.jsonl; validation: the last --batch-size of the file), rendered with SmolLM2's
chat template after the same system turn (SYSTEM), so both sample from the same prompt tokens
(checked before the runs). Both: LoRA r=8, alpha 16 (scale 2), no dropout, on q_proj,v_proj of the
last 4 blocks; AdamW without weight decay at --learning-rate; --batch-size prompts per step, G
completions each, at most --max-completion-tokens, --temperature, top-p 1 and no top-k or min-p;
loss type `grpo` (sequence mean), epsilon 0.2, --beta; one validation batch of the valid prompts
twice (ours before the first step and after the last, theirs before the first and before the last),
seed 0. mlx-lora's CPU kernels are chosen (measured once per machine, then cached) before any timed
run, so none pays for the measurement.

Rewards: ours `exact-match` (the number after `####`, normalised, against the reference's); theirs
`r1_accuracy_reward_func`, its GSM8K accuracy reward and the closest it has: 2.0 when the text
between <answer> tags (the whole completion without tags) equals the answer string exactly. Their
trainer does the same work whatever the rewards; ours leaves out groups whose rewards are all equal
(printed as `skipped`: on this model nearly every group scores 0 on exact match, so ours then makes
few updates or none). --dense-reward adds to both the same reward, -0.001 per character of the
completion (length_reward here), which tells apart nearly every two completions of a group: ours
then updates on every group, as theirs does, and the update times compare like with like.

What cannot be matched, and the closest chosen:
- Reference: mlx-lm-lora's command loads a second copy of the model as the reference for GRPO,
  whatever beta; so does this bench (its peak memory counts it), running it only when beta > 0.
  Ours runs the same model with the adapter off.
- Old policy: theirs is on-policy only (its ratio is exp(logp - stop_gradient(logp)) = 1); so is
  ours with --grpo-iterations 1 (this bench), which needs a pass of its own only for more.
- Sampling: their command passes no top-p/top-k to the trainer (0.95 and 20 then); this bench calls
  train_grpo with top_p 1, top_k 0, min_p 0, as ours samples. Their end_answer_token ("</answer>",
  an extra stop sequence) is turned off: ours stops at EOS or the length limit alone.
- Advantages: theirs divide by the population std, ours by the Bessel-corrected one (TRL's).
- Batching of the rollouts, each tool's own: theirs prefills each prompt once and forks its cache
  for the G completions, then decodes --batch-size sequences at a time; ours prefills each prompt
  once too, then decodes all --batch-size x G at once.
- Prompt order: ours shuffles its batches by --seed; theirs sorts by length and permutes batches.
  Each step reads --batch-size fresh prompts of the same --steps x --batch-size.

Timing: a step is ours' GrpoStep.step call, theirs from the start of its rollout (generate_grpo)
to its per-step report (steps_per_report 1), after its mx.eval: the validation passes lie outside
both. The rollout is the sampling (ours' GrpoStep.roll_out, with its reward scoring; theirs'
generate_grpo); the update is the rest of the step: ours' frozen blocks, reference (and, with
more than one iteration, old-policy) log-probs and the optimizer update, theirs' rewards,
reference pass and update. Seconds per step are the median of the steps after the first. The
whole command is the process's wall time as the driver sees it (loading, data, validations,
steps, saving): ours is `mlx-lora train`'s own entry point; theirs is this script doing what
`mlx_lm_lora.train --train-mode grpo` does (load the model and the reference copy, wrap LoRA,
build GRPODataset, train_grpo, which saves), less its final fuse.
Peak memory is mx.get_peak_memory() from process start and the process's max RSS.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402
from train_speed import REAL, _blas_in_maps, build_model, machine_line, sgemm_peak  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "Solve the problem. End your reply with #### and the final number."
LORA = dict(rank=8, alpha=16.0, layers=4)
TARGETS = ("q_proj", "v_proj")
EPSILON = 0.2
LOSS_TYPE = "grpo"
SEED = 0


# ---- data -------------------------------------------------------------------------------------


def build_data(rows: int, batch_size: int, out: Path) -> Path:
    """The same problems in each tool's format under out/ours and out/theirs: ours chat rows whose
    last assistant turn is the reference answer, theirs GRPODataset rows (prompt, answer, system)."""
    from mlx_lora.data.answers import final_answer

    problems = [json.loads(line) for line in (ROOT / "data" / "train.jsonl").read_text().splitlines()]
    for split, chosen in (("train", problems[:rows]), ("valid", problems[-batch_size:])):
        ours, theirs = [], []
        for p in chosen:
            question, reference = p["prompt"].removesuffix("\nA:").strip(), p["completion"].strip()
            turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            ours.append({"messages": [*turns, {"role": "assistant", "content": reference}]})
            theirs.append({"prompt": question, "answer": final_answer(reference), "system": SYSTEM})
        for who, lines in (("ours", ours), ("theirs", theirs)):
            (out / who).mkdir(parents=True, exist_ok=True)
            (out / who / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return out


def same_prompts(model_dir: Path, data: Path) -> int:
    """Both tools' prompt tokens of the training rows, which must be equal: their count."""
    from mlx_lm.utils import load_tokenizer
    from mlx_lm_lora.trainer.datasets import GRPODataset

    from mlx_lora.data.rows import file_rows
    from mlx_lora.training.rewards import task

    tok = load_tokenizer(model_dir)
    ours = [task(row, tok)[1] for row in file_rows(str(data / "ours" / "train.jsonl"))]
    rows = [json.loads(line) for line in (data / "theirs" / "train.jsonl").read_text().splitlines()]
    theirs = [list(item[0]) for item in GRPODataset(rows, tok)]
    if ours != theirs:
        sys.exit(f"the two tools would sample from different prompts:\n{ours[0]}\n{theirs[0]}")
    return sum(len(t) for t in ours)


def length_reward(prompt: str, completion: str, row: dict) -> float:
    """--dense-reward, ours: `python:bench/grpo_speed.py:length_reward`."""
    return -0.001 * len(completion)


def length_rewards(prompts: list, completions: list, answer: list, types=None) -> list[float]:
    """--dense-reward, theirs: length_reward in mlx-lm-lora's reward signature."""
    return [length_reward(p, c, {}) for p, c in zip(prompts, completions)]


# ---- the runs, each in its own process ----------------------------------------------------------


def _finish(steps: list[dict], peak: float) -> None:
    out = dict(steps=steps, peak_mlx=peak, max_rss=train_speed.peak_rss())
    out.update(blas=_blas_in_maps(), torch=sys.modules.get("torch") is not None)
    print("RESULT " + json.dumps(out), flush=True)


def run_ours(job: dict) -> None:
    import mlx_lora  # noqa: F401  (OpenBLAS before mlx.core)

    # isort: split
    import mlx.core as mx

    from mlx_lora.cli import app
    from mlx_lora.training.grpo_step import GrpoStep

    mx.reset_peak_memory = lambda: None  # count from process start, as for theirs
    steps, sampling, real_step, real_roll_out = [], [], GrpoStep.step, GrpoStep.roll_out

    def timed_roll_out(self, prompts):  # sampling (and scoring): the rest of the step is the update's
        start = time.perf_counter()
        scored = real_roll_out(self, prompts)
        sampling.append(time.perf_counter() - start)
        return scored

    def timed(self, batches):
        sampling.clear()
        start = time.perf_counter()
        stats = real_step(self, batches)
        seconds = time.perf_counter() - start
        steps.append(dict(seconds=seconds, rollout=sum(sampling), update=seconds - sum(sampling)))
        steps[-1].update(tokens=stats["completion_length"], reward=stats["reward"], skipped=stats["skipped_groups"])
        return stats

    GrpoStep.step, GrpoStep.roll_out = timed, timed_roll_out
    flags = dict(
        objective="grpo",
        model=job["model"],
        data=job["data"],
        adapter_path=job["adapters"],
        targets=",".join(TARGETS),
        rank=LORA["rank"],
        alpha=LORA["alpha"],
        num_layers=LORA["layers"],
        batch_size=job["batch_size"],
        iters=job["steps"],
        learning_rate=job["lr"],
        group_size=job["group_size"],
        max_completion_tokens=job["max_tokens"],
        temperature=job["temperature"],
        top_p=1.0,
        beta=job["beta"],
        epsilon=EPSILON,
        loss_type=LOSS_TYPE,
        rewards="exact-match" + (f",python:{Path(__file__).resolve()}:length_reward" if job["dense"] else ""),
        val_batches=1,
        val_every=0,
        save_every=0,
        report_every=1,
        seed=SEED,
    )
    app(["train", *(s for k, v in flags.items() for s in (f"--{k.replace('_', '-')}", str(v)))], standalone_mode=False)
    _finish(steps, mx.get_peak_memory())


def _their_model(job: dict):
    """(policy with LoRA, reference copy, tokenizer), as mlx_lm_lora.train's run() loads them for grpo."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(SEED)  # as mlx_lm_lora.train's run() and train_model() seed
    np.random.seed(SEED)
    model, tokenizer = load(job["model"])
    reference, _ = load(job["model"])  # load_reference_model: loaded for --train-mode grpo whatever beta
    reference.freeze()
    model.freeze()
    lora = {"rank": LORA["rank"], "scale": LORA["alpha"] / LORA["rank"], "dropout": 0.0}
    linear_to_lora_layers(model, LORA["layers"], {**lora, "keys": [f"self_attn.{t}" for t in TARGETS]})
    return model, reference, tokenizer


def _their_args(job: dict):
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs

    return GRPOTrainingArgs(
        batch_size=job["batch_size"],
        iters=job["steps"],
        val_batches=1,
        steps_per_report=1,
        steps_per_eval=10**9,  # validations at the first and last step only, as ours at start and end
        steps_per_save=10**9,
        adapter_file=str(Path(job["adapters"]) / "adapters.safetensors"),
        max_completion_length=job["max_tokens"],
        beta=job["beta"],
        group_size=job["group_size"],
        epsilon=EPSILON,
        temperature=job["temperature"],
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        grpo_loss_type=LOSS_TYPE,
    )


def run_theirs(job: dict) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm_lora.trainer.grpo_trainer as grpo
    from mlx_lm_lora.trainer.datasets import GRPODataset
    from mlx_lm_lora.trainer.grpo_reward_functions import r1_accuracy_reward_func

    model, reference, tokenizer = _their_model(job)
    data = {
        split: GRPODataset([json.loads(line) for line in (Path(job["data"]) / f"{split}.jsonl").open()], tokenizer)
        for split in ("train", "valid")
    }
    rollouts, steps, real = [], [], grpo.generate_grpo

    def timed_rollout(*a, **k):
        start = time.perf_counter()
        out = real(*a, **k)
        rollouts.append((start, time.perf_counter(), statistics.mean(len(c) for c in out[0])))
        return out

    class Callback:
        def on_train_loss_report(self, info):  # after the step's mx.eval; the latest rollout is the step's
            start, rolled, tokens = rollouts[-1]
            end = time.perf_counter()
            steps.append(dict(seconds=end - start, rollout=rolled - start, update=end - rolled, tokens=tokens))
            steps[-1]["reward"] = info["train_total_rewards_mean"]

        def on_val_loss_report(self, info):
            pass

    grpo.generate_grpo = timed_rollout
    args = _their_args(job)
    Path(job["adapters"]).mkdir(parents=True, exist_ok=True)
    optimizer = optim.AdamW(learning_rate=job["lr"], weight_decay=0.0)
    grpo.train_grpo(
        model,
        reference,
        tokenizer,
        optimizer,
        data["train"],
        data["valid"],
        reward_funcs=[r1_accuracy_reward_func, *([length_rewards] if job["dense"] else [])],
        args=args,
        training_callback=Callback(),
        end_answer_token="",
    )
    _finish(steps, mx.get_peak_memory())


# ---- the driver ---------------------------------------------------------------------------------

NAMES = {"ours": "mlx-lora", "theirs": "mlx-lm-lora"}
KERNELS = (
    "import sys, mlx_lora\n"
    "from mlx_lora.model.base import load_base\n"
    "from mlx_lora.model.cpu_kernels import choose_kernels, wanted\n"
    'print(choose_kernels(load_base(sys.argv[1], lazy=True).model, True).line() if wanted() else "MLX\'s own")'
)


def kernels(model_dir: Path, env: dict) -> str:
    """Ours' CPU kernels as train chooses them: measured now if this machine has not yet (then kept
    in the cache), so that no timed run pays for the measurement."""
    cmd = [sys.executable, "-c", KERNELS, str(model_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def spawn(who: str, job: dict, env: dict) -> dict:
    res = train_speed.spawn(who, dict(job, hide_torch=True), env, script=__file__)
    if len(res["steps"]) != job["steps"]:
        sys.exit(f"{who} timed {len(res['steps'])} steps of {job['steps']}")
    return res


def summary(res: dict) -> dict:
    """One run's figures: medians over the steps after the first, means of tokens and reward."""
    later = res["steps"][1:] or res["steps"]
    out = {k: statistics.median(s[k] for s in later) for k in ("seconds", "rollout", "update")}
    out.update({k: statistics.mean(s[k] for s in res["steps"]) for k in ("tokens", "reward")})
    if "skipped" in res["steps"][0]:
        out["skipped"] = statistics.mean(s["skipped"] for s in res["steps"])
    return dict(out, wall=res["wall"], peak_mlx=res["peak_mlx"], max_rss=res["max_rss"])


def checked(p: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    for name, least in (("steps", 2), ("group_size", 2), ("max_completion_tokens", 1), ("batch_size", 1)):
        if getattr(a, name) < least:  # 2 steps: the first is left out of s/step; 2 completions: a group
            p.error(f"--{name.replace('_', '-')} must be at least {least}")
    if a.rounds < 1 or a.temperature <= 0 or a.beta < 0:
        p.error("--rounds must be at least 1, --temperature positive, --beta 0 or more")
    return a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-completion-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (0: neither runs a reference pass)")
    p.add_argument(
        "--dense-reward",
        action="store_true",
        help="add -0.001 per completion character to both tools' rewards, so ours skips no group",
    )
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, default=1, help="alternating repetitions; medians reported")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--work", type=Path, default=None, help="keep the model and data here (default: a temp dir)")
    a = checked(p, p.parse_args())

    import mlx_lora.blas as blas

    openblas = blas._find_openblas()
    work = a.work or Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    model_dir = work / f"model-{REAL}"
    if not (model_dir / "config.json").exists():
        build_model(REAL, model_dir)
    data = build_data(a.steps * a.batch_size, a.batch_size, work / f"data-grpo-{a.steps * a.batch_size}")
    prompt_tokens = same_prompts(model_dir, data)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    env = dict(env, EXPECT_OPENBLAS="1") if openblas else env
    envs = {"ours": env, "theirs": dict(env, LD_PRELOAD=openblas or "")}
    peak = sgemm_peak(a.threads)
    print(machine_line(peak, a.threads), flush=True)
    choice = kernels(model_dir, envs["ours"])
    job = dict(
        model=str(model_dir),
        steps=a.steps,
        batch_size=a.batch_size,
        group_size=a.group_size,
        max_tokens=a.max_completion_tokens,
        temperature=a.temperature,
        beta=a.beta,
        lr=a.learning_rate,
        dense=a.dense_reward,
    )
    results: dict[str, list[dict]] = {w: [] for w in NAMES}
    for r in range(a.rounds):
        for w in NAMES:
            run = dict(job, data=str(data / w), adapters=str(work / f"adapters-grpo-{w}-{r}"))
            s = summary(spawn(w, run, envs[w]))
            results[w].append(s)
            print(
                f"round {r + 1} {NAMES[w]:12s} wall {s['wall']:6.1f} s  {s['seconds']:6.2f} s/step "
                f"(rollout {s['rollout']:.2f}, update {s['update']:.2f})  peak {_gb(s['peak_mlx'])}  "
                f"RSS {_gb(s['max_rss'])}",
                flush=True,
            )
    report(a, results, prompt_tokens, peak, openblas, choice)


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f} GB"


ROWS = [  # label, key, format, ratio: theirs/ours for times ("x faster"), ours/theirs for memory
    ("whole command", "wall", "{:.1f} s", "speed"),
    ("s/step (median, first excluded)", "seconds", "{:.2f} s", "speed"),
    ("  rollout s/step", "rollout", "{:.2f} s", "speed"),
    ("  update s/step", "update", "{:.2f} s", "speed"),
    ("completion tokens (mean)", "tokens", "{:.1f}", None),
    ("reward (mean; exact match: theirs 2, ours 1)", "reward", "{:.3f}", None),
    ("groups skipped (ours)", "skipped", "{:.0%}", None),
    ("peak MLX memory", "peak_mlx", None, "memory"),
    ("max RSS", "max_rss", None, "memory"),
]


def report(a, results: dict[str, list[dict]], prompt_tokens: int, peak: float, openblas, choice: str) -> None:
    print(
        f"\n{platform.node()} {platform.machine()} {os.cpu_count()} cpus, {a.threads} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; {a.rounds} round(s), medians; OpenBLAS {openblas}\n"
        f"{machine_line(peak, a.threads)}\nmlx-lora's CPU kernels: {choice}\n"
        f"GRPO on SmolLM2-135M-Instruct (fp32): {a.steps} steps of {a.batch_size} prompts x G={a.group_size}, "
        f"<= {a.max_completion_tokens} completion tokens, temperature {a.temperature}, beta {a.beta}, "
        f"lr {a.learning_rate}, loss {LOSS_TYPE}; LoRA r={LORA['rank']} alpha {LORA['alpha']:g} on "
        f"{','.join(TARGETS)} of the last {LORA['layers']} blocks; {prompt_tokens} prompt tokens, the same for both\n"
    )
    print(f"| | {NAMES['ours']} | {NAMES['theirs']} | ours vs theirs |\n|---|---:|---:|---:|")
    for label, key, fmt, ratio in ROWS:
        med = {w: statistics.median(r[key] for r in runs) if key in runs[0] else None for w, runs in results.items()}
        cells = ["-" if v is None else (_gb(v) if fmt is None else fmt.format(v)) for v in med.values()]
        if ratio == "speed" and med["ours"] and med["ours"] > 1e-3:
            speed = med["theirs"] / med["ours"]
            cells.append(f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower")
        elif ratio == "memory" and med["theirs"]:
            cells.append(f"{med['ours'] / med['theirs']:.2f}x the memory")
        else:
            cells.append("")
        print(f"| {label} | " + " | ".join(cells) + " |")
    skipped = statistics.median(r["skipped"] for r in results["ours"])
    if skipped:
        print(
            f"\nours skipped {skipped:.0%} of its groups (all rewards equal) and made no update for them, while "
            "theirs updates on every group; --dense-reward times the updates like with like"
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_run":
        sys.modules["torch"] = None  # neither tool needs torch; transformers would import it for the tokenizer
        {"ours": run_ours, "theirs": run_theirs}[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        main()
