import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import CFG_A, CFG_B, fp32_tol, generate_alone, save_random_adapter
from mlx_lm.models.cache import make_prompt_cache

from mlx_lora.config import LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.inference.batching import BatchEngine, Event, Sampling
from mlx_lora.inference.multi_lora import AdapterSlots, RoutedModel, vocab_size
from mlx_lora.model import decoder
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels, use_mlx_kernels

CFG_C = LoRAConfig(targets="all-linear", num_layers=1, rank=3, alpha=3)  # another rank: padding is exercised
PROMPTS = ["Q: What is 2 + 3?\nA:", "The cat sat on", "Hello world", "One two three four", "Tom has 3 apples"]


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return {
        "a": save_random_adapter(llama, root / "a", CFG_A, 1),
        "b": save_random_adapter(llama, root / "b", CFG_B, 2),
        "c": save_random_adapter(llama, root / "c", CFG_C, 3),
    }


@pytest.fixture(scope="module")
def engine(llama, adapters):
    engine = BatchEngine(load_base(str(llama)), max_batch=16)
    for name, path in adapters.items():
        engine.add_adapter(name, path).result()
    yield engine
    engine.close()


def alone(llama, adapter_dir, prompt: str, max_tokens: int) -> str:
    return generate_alone(llama, adapter_dir, prompt, max_tokens)


def run_all(engine: BatchEngine, requests: list[tuple[list[int], str | None, Sampling]]) -> list[tuple[str, str]]:
    """Submit every request at once and wait for all; (text, finish_reason) of each."""
    texts = [[] for _ in requests]
    finished = [None] * len(requests)
    done = threading.Semaphore(0)

    def collect(i: int, event: Event) -> None:
        texts[i].append(event.text)
        if event.finish_reason:
            finished[i] = event.finish_reason
            done.release()

    for i, (tokens, adapter, sampling) in enumerate(requests):
        engine.submit(tokens, adapter, sampling, lambda e, i=i: collect(i, e))
    for _ in requests:
        assert done.acquire(timeout=120), "a request never finished"
    return [("".join(t), f) for t, f in zip(texts, finished)]


def test_each_row_of_a_mixed_forward_equals_its_adapter_alone(llama, adapters):
    tokens = [1, 50, 51, 52, 53, 30, 7]
    slots = AdapterSlots(load_base(str(llama)))
    for name, path in adapters.items():
        slots.add(name, path)
    vocab = vocab_size(slots.base.model)
    routed = RoutedModel(slots.base.model, slots.rows, vocab)
    order = [None, "c", "a", "b", "a"]
    ids = mx.array([[t + slots.slot(n) * vocab for t in tokens] for n in order])
    mixed = np.array(routed(ids))  # (5, T, V)
    for row, name in enumerate(order):
        single = load_for_inference(str(llama), str(adapters[name]) if name else None).model
        expected = np.array(single(mx.array([tokens])))[0]
        # fp32 through other shapes (a gathered, zero-padded rank, the scale folded into B)
        assert np.allclose(mixed[row], expected, atol=1e-4, rtol=1e-4), (name, np.abs(mixed[row] - expected).max())
        if name is None:  # slot 0 adds exact zeros: bit for bit the base on a batch of the same shape
            same_shape = np.array(single(mx.array([tokens] * len(order))))[row]
            assert np.array_equal(mixed[row], same_shape)


def test_a_mixed_batch_through_the_decoder_equals_mlx(llama, adapters, monkeypatch):
    """serve's rows, each with its own adapter (stacked, one a row), decoded step by step by
    model/decoder.py give MLX's own logits; an adapter added drops the decoder, whose products held
    the stacks it replaced."""
    slots = AdapterSlots(load_base(str(llama)))
    for name in ("a", "c"):
        slots.add(name, adapters[name])
    model, vocab, order = slots.base.model, vocab_size(slots.base.model), [None, "c", "a", "c", "a"]
    routed = RoutedModel(model, slots.rows, vocab)

    def steps() -> list[np.ndarray]:
        def ids(tokens: list[int]) -> mx.array:
            return mx.array([[t + slots.slot(n) * vocab for t in tokens] for n in order])

        cache = make_prompt_cache(model)
        out = [routed(ids([1, 50, 51, 52]), cache=cache)[:, -1]]
        out += [routed(ids([t]), cache=cache)[:, -1] for t in (7, 30, 12)]
        return [np.array(o) for o in out]

    use_cpu_kernels(model, decoding=True)
    calls, original = [], decoder.Decoder.batch
    monkeypatch.setattr(decoder.Decoder, "batch", lambda self, *a: calls.append(len(a[0])) or original(self, *a))
    ours = steps()
    assert calls == [5, 5, 5]
    use_mlx_kernels(model)
    theirs = steps()
    # the test models' logits come out of 4 blocks of ~8 sums of up to 128 terms, summed in other orders
    # than MLX's (tests/model/test_decoder.py's TOL)
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a - b).max() <= fp32_tol(128 * 8 * 4) * np.abs(b).max()
    assert not np.allclose(theirs[-1][1], theirs[-1][0], atol=1e-3)  # adapter c changed its row
    use_cpu_kernels(model, decoding=True)
    steps()
    assert model.__dict__[decoder.KEPT][1] is not None
    slots.add("b", adapters["b"])
    assert decoder.KEPT not in model.__dict__


def test_greedy_text_in_a_mixed_batch_equals_generate_with_that_adapter_alone(llama, adapters, engine):
    tokenizer = engine.base.tokenizer
    cases = [(p, name) for p in PROMPTS[:3] for name in (None, "a", "b", "c")]
    got = run_all(engine, [(tokenizer.encode(p), name, Sampling(max_tokens=12)) for p, name in cases])
    expected = [alone(llama, adapters[name] if name else None, p, 12) for p, name in cases]
    assert [text for text, _ in got] == expected
    assert len(set(expected)) > len(PROMPTS[:3]) * 2  # the adapters really answer differently
    assert engine.peak_mix >= 3  # and several of them shared one decoding step


def test_stop_strings_cut_the_text_and_max_tokens_ends_it(engine):
    cases = [(engine.base.tokenizer.encode(p), n) for p in PROMPTS for n in (None, "a", "b", "c")]
    results = run_all(engine, [(tokens, n, Sampling(max_tokens=10)) for tokens, n in cases])
    assert {reason for _, reason in results} <= {"stop", "length"} and "length" in {r for _, r in results}
    (tokens, name), (full, _) = next((c, r) for c, r in zip(cases, results) if r[1] == "length" and len(r[0]) > 4)
    stop = full[2:4]
    [(cut, reason)] = run_all(engine, [(tokens, name, Sampling(max_tokens=10, stop=(stop, "never seen")))])
    assert reason == "stop" and cut == full[: full.index(stop)]


def test_a_seed_gives_the_same_sample_whatever_shares_the_batch(engine):
    tokens = engine.base.tokenizer.encode(PROMPTS[1])
    hot = Sampling(max_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    [(first, _)] = run_all(engine, [(tokens, "b", hot)])
    warm = Sampling(max_tokens=10, temperature=1.0)
    crowd = [(engine.base.tokenizer.encode(p), n, warm) for p in PROMPTS for n in "ac"]
    results = run_all(engine, [*crowd[:5], (tokens, "b", hot), *crowd[5:]])
    assert results[5][0] == first
    other = run_all(engine, [(tokens, "b", Sampling(max_tokens=10, temperature=1.5, top_p=0.9, seed=8))])
    assert other[0][0] != first  # the seed matters (10 tokens at temperature 1.5 from a flat tiny model)


def test_adapters_come_and_go_at_run_time(llama, adapters, tmp_path):
    engine = BatchEngine(load_base(str(llama)), max_batch=4)
    try:
        tokens = engine.base.tokenizer.encode(PROMPTS[2])
        one = lambda name: run_all(engine, [(tokens, name, Sampling(max_tokens=8))])[0][0]
        base_text = run_all(engine, [(tokens, None, Sampling(max_tokens=8))])[0][0]
        engine.add_adapter("a", adapters["a"]).result()
        with pytest.raises(UserError, match="already loaded"):
            engine.add_adapter("a", adapters["b"]).result()
        assert one("a") == alone(llama, adapters["a"], PROMPTS[2], 8)
        engine.remove_adapter("a").result()
        assert engine.names == []
        engine.add_adapter("b", adapters["b"]).result()  # takes the freed slot
        assert engine.adapters.slot("b") == 1
        assert one("b") == alone(llama, adapters["b"], PROMPTS[2], 8)
        assert one(None) == base_text
        dora = LoRAConfig(targets="q_proj", num_layers=1, rank=2, alpha=2, dora=True)
        with pytest.raises(UserError, match="DoRA"):
            engine.add_adapter("d", save_random_adapter(llama, tmp_path / "d", dora, 4)).result()
        assert one(None) == base_text
    finally:
        engine.close()


def test_a_cancelled_request_frees_its_row(engine):
    tokens = engine.base.tokenizer.encode(PROMPTS[3])
    seen = threading.Event()
    job = engine.submit(tokens, "c", Sampling(max_tokens=400), lambda e: seen.set())
    assert seen.wait(60)
    engine.cancel(job)
    run_all(engine, [(tokens, None, Sampling(max_tokens=2))])  # a round trip through the worker after the cancel
    assert engine.active == 0


def test_a_quantized_base_and_adapters_in_other_formats_mix_too(llama, adapters, tmp_path):
    """4-bit base (mlx-lm's own quantization); b as PEFT files and c as mlx_lm.lora files, beside our a."""
    from mlx_lm.convert import convert as quantize

    from mlx_lora.commands.convert import convert
    from mlx_lora.config import ConvertConfig

    quantize(str(llama), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    convert(ConvertConfig(str(adapters["b"]), str(tmp_path / "b-peft"), to="peft"), log=lambda _: None)
    convert(ConvertConfig(str(adapters["c"]), str(tmp_path / "c-mlxlm"), to="mlx-lm"), log=lambda _: None)
    served = {"a": adapters["a"], "b": tmp_path / "b-peft", "c": tmp_path / "c-mlxlm"}
    engine = BatchEngine(load_base(str(tmp_path / "q4")), max_batch=8)
    try:
        for name, path in served.items():
            engine.add_adapter(name, path).result()
        cases = [(p, name) for p in PROMPTS[:2] for name in (None, "a", "b", "c")]
        got = run_all(engine, [(engine.base.tokenizer.encode(p), n, Sampling(max_tokens=10)) for p, n in cases])
    finally:
        engine.close()
    expected = [generate_alone(tmp_path / "q4", served[n] if n else None, p, 10) for p, n in cases]
    assert [text for text, _ in got] == expected


def test_a_long_prompt_is_read_in_chunks_others_join_between_and_a_cancel_stops_it_within_one(llama):
    """A prompt of 100 chunks: a short request sent while it is read is answered first (the old
    engine read every chunk before it looked at its queue again); cancelled, it reads one chunk more at most."""
    engine = BatchEngine(load_base(str(llama)), max_batch=4, prefill_step=16)
    try:
        tokenizer = engine.base.tokenizer
        long = (tokenizer.encode(" ".join(PROMPTS)) * 40)[:1600]  # 100 chunks of 16
        short = tokenizer.encode(PROMPTS[0])
        ends = []
        job = engine.submit(long, None, Sampling(max_tokens=1), lambda e: ends.append(e.finish_reason))
        assert engine.call(lambda: engine.active).result(timeout=60) == 1  # the worker has taken it in
        [(text, _)] = run_all(engine, [(short, None, Sampling(max_tokens=4))])
        assert ends == [] and engine.prefill_steps < 100  # answered while the long prompt is being read
        engine.cancel(job)  # at once: the worker reads on (comparing with generate_alone first let it finish once)
        at_cancel = engine.prefill_steps  # the worker may be inside one more chunk
        after = engine.call(lambda: engine.prefill_steps).result(timeout=60)
        assert after <= at_cancel + 1 and engine.call(lambda: engine.prefill_steps).result(timeout=60) == after
        assert engine.active == 0 and ends == []
        assert text == generate_alone(llama, None, PROMPTS[0], 4)  # and joining mid-read changed nothing
    finally:
        engine.close()
