"""Data-parallel training: a group of processes equals one process on the whole batch; a rank
that dies or hangs ends the group with a message, never a hang. The groups here are real: the
ring backend on 127.0.0.1, started by mlx.launch or by setting its variables ourselves."""

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_tensors_close, fp32_tol, preference_rows, write_jsonl

from mlx_lora.config import TrainConfig
from mlx_lora.data.batches import epoch_batches, iterate_batches, rows_read
from mlx_lora.data.examples import Example
from mlx_lora.distributed.group import SOLO, World, init
from mlx_lora.reporting.metrics import read_metrics
from mlx_lora.training.loop import train

MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")


def rank_env() -> dict[str, str]:
    """The test's environment as it is now (conftest gives each test its own MLX_LORA_CACHE)."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def free_ports(n: int) -> int:
    """A first port p with p .. p+n-1 free (mlx.launch -p uses consecutive ones)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n < 65536 and all(_free(first + i) for i in range(n)):
            return first
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_rank(rank: int, hostfile: Path, args: list[str]) -> subprocess.Popen:
    """One rank of a ring group, with the variables mlx.launch would set."""
    env = {**rank_env(), "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)}
    return subprocess.Popen(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def ring_hostfile(tmp_path: Path, size: int) -> Path:
    """What mlx.launch --backend ring writes: one list of addresses per rank."""
    port = free_ports(size)
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port + i}"] for i in range(size)]))
    return path


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if re.search(pattern, line):
                return line
            if not line:
                break
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; stderr: {end(proc)[1]}")


def end(proc: subprocess.Popen, timeout: float = 10) -> tuple[str, str]:
    """Its remaining output; killed (with its process group) if still running after `timeout`."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


# --- sharding ------------------------------------------------------------------------------------


def _examples(lengths) -> list[Example]:
    return [Example(np.arange(1, n + 1, dtype=np.int32), np.arange(n) > 0) for n in lengths]


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_split_each_global_batch_exactly(size):
    examples = _examples([3, 9, 4, 12, 5, 7, 6, 10, 8])  # 9 rows in batches of 4: one has a single row
    batch = 4
    whole = iterate_batches(examples, batch, seed=1)
    ranks = [iterate_batches(examples, batch, seed=1, shard=World(rank=r, size=size).shard) for r in range(size)]
    order = epoch_batches(examples, batch, seed=1, epoch=0) + epoch_batches(examples, batch, seed=1, epoch=1)
    for indices in order:
        _, (tokens, mask), count = next(whole)
        parts = [(*batch, n) for _, batch, n in (next(r) for r in ranks)]
        assert [p[2] for p in parts] == [count] * size  # every rank knows the whole batch's size
        shares = [indices[r::size] for r in range(size)]
        assert sorted(sum(shares, [])) == sorted(indices)
        for share, (t, m, _) in zip(shares, parts):
            if share:
                expected = [examples[i].tokens.tolist() for i in share]
                assert [row[: len(e)] for row, e in zip(np.array(t).tolist(), expected)] == expected
            else:  # more ranks than rows: a row that teaches nothing keeps the rank in the sum
                assert not np.array(m).any()
        assert sum(int(np.array(p[1]).sum()) for p in parts) == int(np.array(mask).sum())


@pytest.mark.parametrize(("start", "count"), [(0, 3), (2, 4), (1, 12)])  # within an epoch, across one, three
def test_rows_read_are_the_rows_a_rank_is_given(start, count):
    examples = _examples([3, 9, 4, 12, 5, 7, 6, 10, 8])  # batches of 4: one of a single row, which rank 1 lacks
    for rank in range(2):
        world = World(rank=rank, size=2)
        given = iterate_batches(examples, 4, seed=1, start=start, shard=world.shard)
        want = sorted({i for _ in range(count) for i in next(given)[0]})
        assert rows_read(examples, 4, 1, start, count, world.shard).tolist() == want


def test_a_process_started_alone_or_by_mlx_launch_n_1_is_a_group_of_one(tmp_path, monkeypatch):
    assert init(5) is SOLO
    (tmp_path / "hosts.json").write_text("\n")  # what mlx.launch -n 1 writes
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts.json"))
    monkeypatch.setenv("MLX_RANK", "0")
    assert init(5) is SOLO


# --- failures: a peer that never joins, hangs or dies --------------------------------------------

GROUP_SCRIPT = """
import sys, time
from mlx_lora.distributed.group import init
import mlx.core as mx
world = init(float(sys.argv[1]))
print("joined", world.rank, world.size, flush=True)
for i in range(1000):
    with world.waiting(f"in step {i}"):
        mx.eval(world.sum(mx.array(1.0)))
    time.sleep(0.05)
"""


@pytest.mark.once
def test_a_peer_that_never_joins_ends_the_wait(tmp_path):
    hostfile = ring_hostfile(tmp_path, 2)
    start = time.monotonic()
    alone = start_rank(0, hostfile, ["-c", GROUP_SCRIPT, "2"])
    out, err = end(alone, timeout=60)
    assert alone.returncode == -signal.SIGKILL
    assert "error: rank 0: waited 2 s for the other processes to join the group" in err
    assert "joined" not in out
    assert time.monotonic() - start < 45


@pytest.mark.once
def test_a_hung_peer_ends_the_group_within_the_timeout(tmp_path):
    hostfile = ring_hostfile(tmp_path, 2)
    # rank 1's own watchdog waits longer, so its death can't end rank 0 before rank 0's watchdog does
    ranks = [start_rank(r, hostfile, ["-c", GROUP_SCRIPT, timeout]) for r, timeout in enumerate(["3", "120"])]
    try:
        for r in ranks:
            wait_for_line(r, "joined", 60)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = end(ranks[0], timeout=30)
        assert ranks[0].returncode == -signal.SIGKILL, err
        assert re.search(
            r"error: rank 0: waited 3 s for the other processes in step \d+; one of them died or hangs", err
        )
        assert time.monotonic() - stopped < 3 + 15
    finally:
        for r in ranks:
            end(r, timeout=0)


CHECK_SCRIPT = """
import sys
import numpy as np
from mlx_lora.config import TrainConfig
from mlx_lora.data.examples import Example, ExampleSet
from mlx_lora.distributed.group import check_group, init
from mlx_lora.errors import UserError
world = init(60)
rows = [Example(np.arange(n, dtype=np.int32), np.ones(n, bool)) for n in (5, 6, 7)]
mine = {"train": ExampleSet.of(rows[: 2 + world.rank]), "valid": ExampleSet.of(rows)}  # rank 1: one more row
for cfg in (TrainConfig(batch_size=1), TrainConfig()):
    try:
        check_group(world, mine, trainable=100, iters=cfg.iters, batch_size=cfg.batch_size, seed=cfg.seed)
    except UserError as e:
        print(e, flush=True)
"""


def test_ranks_that_differ_in_data_or_batch_are_told_so(tmp_path):
    hostfile = ring_hostfile(tmp_path, 2)
    ranks = [start_rank(r, hostfile, ["-c", CHECK_SCRIPT]) for r in range(2)]
    for proc in ranks:
        out, err = end(proc, timeout=60)
        assert proc.returncode == 0, err
        too_small, differ = out.splitlines()
        assert (
            too_small
            == "--batch-size 1 is the batch of the whole group: give at least one row to each of its 2 processes"
        )
        assert re.fullmatch(
            r"the processes of the group differ in train data checksum \(rank 0: \d+, rank 1: \d+\): "
            r"every host needs the same --data, --model and options",
            differ,
        )


# --- whole runs through the CLI ------------------------------------------------------------------


@pytest.fixture
def odd_data(tiny_data) -> Path:
    """tiny_data with a 17th training row: in batches of 4 one batch has a single row, so one rank
    of two gets none."""
    train, valid = tiny_data / "train.jsonl", tiny_data / "valid.jsonl"
    moved, *rest = valid.read_text().splitlines(keepends=True)
    train.write_text(train.read_text() + moved)
    valid.write_text("".join(rest))
    return tiny_data


TRAIN = dict(num_layers=2, iters=6, batch_size=4, learning_rate=1e-2, val_every=3, save_every=3, report_every=1)


def cli_args(cfg: dict) -> list[str]:
    flag = lambda k: "--" + k.replace("_", "-")
    return [
        (flag(k) if v else "--no-" + flag(k)[2:]) if isinstance(v, bool) else f"{flag(k)}={v}" for k, v in cfg.items()
    ]


def mlx_launch_train(options: dict) -> str:
    """`mlx.launch --backend ring -n 2 -- mlx-lora train ...` on 127.0.0.1; its stdout."""
    cmd = [
        str(MLX_LAUNCH),
        "--backend",
        "ring",
        "-n",
        "2",
        "-p",
        str(free_ports(2)),
        "--",
        sys.executable,
        "-m",
        "mlx_lora.cli",
        "train",
        *cli_args(options),
    ]
    # stdin a pipe held open: mlx.launch forwards its stdin and spins at end of file (/dev/null)
    stdin, keep_open = os.pipe()
    group = subprocess.Popen(
        cmd,
        env=rank_env(),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    os.close(stdin)
    try:
        out, err = end(group, timeout=400)
    finally:
        os.close(keep_open)
    # mlx.launch exits 0 even when a rank failed; it says so in a warning
    assert group.returncode == 0 and not re.search(r"Node with rank \d+ (exited with code|was killed)", err), err
    return out


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch_and_resume_like_it(llama, odd_data, tmp_path):
    alone = train(
        TrainConfig(model=str(llama), data=str(odd_data), adapter_path=str(tmp_path / "one"), **TRAIN),
        log=lambda *a: None,
    )
    out = mlx_launch_train(dict(model=llama, data=odd_data, adapter_path=tmp_path / "two", **TRAIN))

    # rank 0 alone reports, each step once; metrics.jsonl holds the group's losses in full
    assert len(re.findall(r"^step \d+/6  loss ", out, re.M)) == 6
    assert len(re.findall(r"^step \d+/6  val loss ", out, re.M)) == 3
    assert out.count("group of 2 processes") == 1
    records = read_metrics(tmp_path / "two")
    losses = [r["loss"] for r in records if r["loss"] is not None]
    val_losses = {r["step"]: r["val_loss"] for r in records if r["val_loss"] is not None}
    # Each rank sums its half of the batch, then the two halves are added: other shapes, so sums in
    # another order. Longest sums: the gradients' over a batch's 4 x 48 = 192 positions, over 6 AdamW
    # steps: 6 x 3.16 x 192 x 1.2e-7 = 4.3e-4 of the losses and of each tensor's norm (measured: ~1e-7
    # and ~1e-6). A rank that trained on its half alone is off by 2e-2 in the losses, 0.5 in the adapter.
    tol = fp32_tol(4 * 48, adam_steps=6)
    np.testing.assert_allclose(losses, alone.losses, rtol=tol)
    assert val_losses.keys() == alone.val_losses.keys() == {0, 3, 6}
    np.testing.assert_allclose([val_losses[s] for s in (0, 3, 6)], [alone.val_losses[s] for s in (0, 3, 6)], rtol=tol)

    one, two = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    assert max(np.abs(np.array(w)).max() for k, w in one.items() if k.endswith("lora_b")) > 1e-2  # it trained
    assert_tensors_close(two, one, tol, norm=2)
    assert (tmp_path / "two" / "checkpoints" / "step-0000003" / "adapters.safetensors").is_file()
    config = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert config == json.loads((tmp_path / "one" / "adapter_config.json").read_text())

    # a group resumed from the group's checkpoint ends where the uninterrupted single run did
    mlx_launch_train(dict(resume=tmp_path / "two" / "checkpoints" / "step-0000003", adapter_path=tmp_path / "three"))
    three = mx.load(str(tmp_path / "three" / "adapters.safetensors"))
    assert_tensors_close(three, one, tol, norm=2)  # the same 6 steps, 3 of them after the resume


@pytest.mark.once
@pytest.mark.slow
def test_a_rank_that_dies_ends_the_group_with_a_message(llama, odd_data, tmp_path):
    hostfile = ring_hostfile(tmp_path, 2)
    cfg = dict(TRAIN, iters=100000, save_every=0, val_every=0)
    ranks = [
        start_rank(
            r,
            hostfile,
            [
                "-m",
                "mlx_lora.cli",
                "train",
                *cli_args(dict(model=llama, data=odd_data, adapter_path=tmp_path / f"rank{r}", **cfg)),
            ],
        )
        for r in range(2)
    ]
    try:
        wait_for_line(ranks[0], r"^step 1/", 300)
        os.kill(ranks[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = end(ranks[0], timeout=60)
        assert time.monotonic() - killed < 30
        assert ranks[0].returncode == 2, err
        assert re.search(r"error: rank 0: \[ring\] .*: another process of the group died or was stopped", err)
        assert "Traceback" not in err
        assert (tmp_path / "rank0").is_dir() and not (tmp_path / "rank1").exists()  # only rank 0 writes
    finally:
        for r in ranks:
            end(r, timeout=0)


@pytest.mark.slow
def test_group_with_packing_accumulation_and_early_stopping_equals_one_process(llama, odd_data, tmp_path):
    # this run's validation loss turns up after step 3: it stops at step 4 and keeps step 3
    cfg = dict(
        TRAIN,
        pack=True,
        max_seq_length=64,
        grad_accumulation_steps=2,
        iters=12,
        val_every=1,
        early_stopping_patience=1,
        learning_rate=3e-2,
    )
    alone = train(
        TrainConfig(model=str(llama), data=str(odd_data), adapter_path=str(tmp_path / "one"), **cfg),
        log=lambda *a: None,
    )
    out = mlx_launch_train(dict(model=llama, data=odd_data, adapter_path=tmp_path / "two", **cfg))
    # the group stops, and keeps the best step, where one process does (the val loss rises by ~7%
    # at step 4, far more than rounding can move it)
    assert (alone.steps, alone.best_step) == (4, 3)
    assert "early stopping at step 4:" in out and "keeping the adapter of step 3," in out
    one, two = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("one", "two"))
    assert max(np.abs(np.array(w)).max() for k, w in one.items() if k.endswith("lora_b")) > 1e-2  # it trained
    # as in the test above, but a batch is 4 packed sequences of 64 tokens, so the longest sums have
    # 256 terms, and the kept adapter is step 3's: 3 x 3.16 x 256 x 1.2e-7 = 2.9e-4 (measured: 1e-6
    # to 1e-5, one element of a few tensors taking most of it)
    assert_tensors_close(two, one, fp32_tol(4 * 64, adam_steps=3), norm=2)


@pytest.mark.slow
def test_a_streamed_group_equals_one_process_and_resumes_like_it(llama, odd_data, tmp_path):
    cfg = dict(TRAIN, stream_prefix="on")
    one = {
        mode: train(
            TrainConfig(model=str(llama), data=str(odd_data), adapter_path=str(tmp_path / mode), **cfg | mode_options),
            log=lambda *a: None,
        )
        for mode, mode_options in (("streamed", {}), ("whole", dict(stream_prefix="off")))
    }
    out = mlx_launch_train(dict(model=llama, data=odd_data, adapter_path=tmp_path / "two", **cfg))
    # rank 0 streamed its rows alone: 6 batches of 4 over 17 + 7 rows, half of each batch
    streamed, total = map(int, re.search(r"streamed block 1/1 over the (\d+) of (\d+) rows this process", out).groups())
    assert total == 17 + 7 and streamed < total
    records = read_metrics(tmp_path / "two")
    losses = [r["loss"] for r in records if r["loss"] is not None]
    val_losses = {r["step"]: r["val_loss"] for r in records if r["val_loss"] is not None}
    # the tolerance of the in-memory group above (a batch split in two halves, 6 AdamW steps); the
    # states entering block 2 are computed in groups of rows by length, which adds sums over the
    # 128-wide MLP and 64-wide attention per frozen block, far below it (measured: losses 2e-7,
    # adapter 1.4e-6 off, against one process streamed or in memory alike)
    tol = fp32_tol(4 * 48, adam_steps=6)
    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    for mode, alone in one.items():
        np.testing.assert_allclose(losses, alone.losses, rtol=tol, err_msg=mode)
        assert val_losses.keys() == alone.val_losses.keys() == {0, 3, 6}
        np.testing.assert_allclose(
            [val_losses[s] for s in (0, 3, 6)], [alone.val_losses[s] for s in (0, 3, 6)], rtol=tol
        )
        assert_tensors_close(two, mx.load(str(tmp_path / mode / "adapters.safetensors")), tol, norm=2)

    # resumed at step 3, each rank streams only the rows of the batches left, and ends where one process did
    resumed = mlx_launch_train(
        dict(resume=tmp_path / "two" / "checkpoints" / "step-0000003", adapter_path=tmp_path / "three")
    )
    fewer = int(re.search(r"streamed block 1/1 over the (\d+) of 24 rows this process", resumed).group(1))
    assert fewer < streamed
    three = mx.load(str(tmp_path / "three" / "adapters.safetensors"))
    assert_tensors_close(three, mx.load(str(tmp_path / "streamed" / "adapters.safetensors")), tol, norm=2)


@pytest.mark.slow
def test_dpo_in_a_group_equals_one_process(llama, tmp_path):
    """Each rank scores its share of the reference pass and of every batch; losses, rewards and
    accuracy summed over the group equal one process's. 9 pairs in batches of 4: one batch has a
    single pair, so one rank holds none and must add nothing."""
    data = tmp_path / "pref"
    write_jsonl(data / "train.jsonl", preference_rows(9))
    write_jsonl(data / "valid.jsonl", preference_rows(4, 20))
    cfg = dict(TRAIN, objective="dpo", beta=0.5, learning_rate=3e-2)
    train(
        TrainConfig(model=str(llama), data=str(data), adapter_path=str(tmp_path / "one"), **cfg),
        log=lambda *a: None,
    )
    out = mlx_launch_train(dict(model=llama, data=data, adapter_path=tmp_path / "two", **cfg))
    assert out.count("reference: log-probs of 13 pairs") == 1
    one, two = (read_metrics(tmp_path / d) for d in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two]
    # Sums of <= 8 rows x 40 positions in other orders and shapes, over 6 AdamW steps, as above.
    tol = fp32_tol(8 * 40, adam_steps=6)
    for key in ("loss", "val_loss", "rewards/chosen", "rewards/rejected", "val_rewards/margins"):
        got, want = [r[key] for r in two if r[key] is not None], [r[key] for r in one if r[key] is not None]
        assert len(got) == len(want) > 0, key
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=key)
    # accuracy counts pairs whose margin is > 0: at step 1 every margin is 0 up to rounding (policy
    # == reference), so either side of 0; after it the mean margins are 4-10, far from a flip
    accuracies = [[r["rewards/accuracies"] for r in m if r["loss"] is not None][1:] for m in (one, two)]
    assert accuracies[0] == accuracies[1]
    assert max(abs(r["rewards/chosen"]) for r in one if r["loss"] is not None) > 1e-2  # it trained
    adapters = [mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("one", "two")]
    assert_tensors_close(adapters[1], adapters[0], tol, norm=2)
