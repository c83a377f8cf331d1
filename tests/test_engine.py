"""The engine: continuous batching, batch invariance, sampling, stops, aborts, limits."""
import asyncio
import threading
import time

import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import QueueFull, Request, RequestError, SamplingParams
from server.model.loader import load_model


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    return load_model(tiny_checkpoints["llama"], dtype=torch.float32)


def make_engine(loaded, **overrides) -> Engine:
    return Engine(loaded, EngineConfig(**{"max_batch": 4, "max_seq_len": 160, **overrides}))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


PROMPTS = [[5, 72, 101, 108], list(range(30, 70)), [9] * 7, list(range(100, 117)), [40, 41, 42, 43, 44, 45, 46, 47, 48]]


def solo(loaded, prompt, params) -> list[int]:
    request = Request(prompt, params)
    make_engine(loaded, max_batch=1).generate([request])
    return request.output_token_ids


def test_batch_invariance_with_staggered_arrivals(loaded):
    """Each request's greedy output alone equals its output beside others that arrive at other steps."""
    expected = [solo(loaded, p, greedy(12 + 3 * i)) for i, p in enumerate(PROMPTS)]
    engine = make_engine(loaded, max_batch=3)
    requests = [Request(p, greedy(12 + 3 * i)) for i, p in enumerate(PROMPTS)]
    outputs = {r.request_id: [] for r in requests}
    arrivals = {0: [0], 2: [1, 2], 5: [3], 9: [4]}  # step -> requests arriving then
    step = 0
    while step <= max(arrivals) or engine.scheduler.has_work():
        for i in arrivals.get(step, []):
            engine.submit(requests[i], outputs[requests[i].request_id].append)
        engine._drain_inbox()
        if engine.scheduler.has_work():
            engine.step()
        assert engine.num_running <= 3
        step += 1
    assert [r.output_token_ids for r in requests] == expected
    assert all(outputs[r.request_id][-1].finish_reason == "length" for r in requests)


def test_many_more_requests_than_rows_all_complete(loaded):
    engine = make_engine(loaded, max_batch=4)
    requests = [Request(PROMPTS[i % len(PROMPTS)], greedy(5 + i % 4)) for i in range(12)]
    outputs = engine.generate(requests)
    for request in requests:
        assert len(request.output_token_ids) == request.params.max_tokens
        assert outputs[request.request_id][-1].finished
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_seeded_sampling_is_reproducible_and_seed_dependent(loaded):
    def sampled(seed, neighbours=0):
        engine = make_engine(loaded)
        request = Request(PROMPTS[0], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50,
                                                     seed=seed, ignore_eos=True))
        others = [Request(p, SamplingParams(max_tokens=20, temperature=1.0)) for p in PROMPTS[1:1 + neighbours]]
        engine.generate([request, *others])
        return request.output_token_ids

    assert sampled(7) == sampled(7) == sampled(7, neighbours=3)
    assert sampled(7) != sampled(8)


def test_top_k_1_equals_greedy(loaded):
    engine = make_engine(loaded)
    a = Request(PROMPTS[1], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, ignore_eos=True))
    b = Request(PROMPTS[1], greedy(10))
    engine.generate([a, b])
    assert a.output_token_ids == b.output_token_ids


def test_stop_string_and_stop_token(loaded):
    full = Request(PROMPTS[1], greedy(20))
    engine = make_engine(loaded)
    outputs = engine.generate([full])[full.request_id]
    text = "".join(o.text for o in outputs)
    assert len(text) > 4
    stop = text[3:5]
    cut = Request(PROMPTS[1], greedy(20, stop=(stop,)))
    by_token = Request(PROMPTS[1], greedy(20, stop_token_ids=(full.output_token_ids[4],)))
    outs = engine.generate([cut, by_token])
    cut_text = "".join(o.text for o in outs[cut.request_id])
    assert cut_text == text[:text.find(stop)]
    assert outs[cut.request_id][-1].finish_reason == "stop"
    first = full.output_token_ids.index(full.output_token_ids[4])
    assert by_token.output_token_ids == full.output_token_ids[:first + 1]
    assert outs[by_token.request_id][-1].finish_reason == "stop"


def test_logprobs(loaded):
    engine = make_engine(loaded)
    request = Request(PROMPTS[0], greedy(4, logprobs=3))
    outputs = engine.generate([request])[request.request_id]
    for output in outputs:
        (entry,) = output.logprobs
        assert entry.top[0][0] == entry.token_id  # greedy takes the most likely token
        assert entry.logprob == pytest.approx(entry.top[0][1]) and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]


def test_limits_are_refused_clearly(loaded):
    engine = make_engine(loaded, max_seq_len=64)
    with pytest.raises(RequestError, match="context is 64 tokens, but the prompt has 70"):
        engine.make_request(list(range(70)), greedy(1))
    with pytest.raises(RequestError, match="exceed"):
        engine.make_request(list(range(40)), greedy(30))
    with pytest.raises(RequestError, match="empty"):
        engine.make_request([], greedy(1))
    with pytest.raises(RequestError, match="token ids"):
        engine.make_request([10**6], greedy(1))
    with pytest.raises(RequestError, match="temperature"):
        engine.make_request([1, 2], SamplingParams(temperature=-1))
    request = engine.make_request(list(range(40)), SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    engine.generate([request])
    assert request.num_tokens == 64 and request.finish_reason == "length"


def test_queue_bound(loaded):
    engine = make_engine(loaded, max_waiting=2)
    engine.submit(Request([1, 2], greedy(2)), lambda o: None)
    engine.submit(Request([1, 2], greedy(2)), lambda o: None)
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], greedy(2)), lambda o: None)


def test_threaded_engine_streams_and_abort_frees_row(loaded):
    engine = make_engine(loaded, max_batch=2)
    engine.start()
    try:
        async def scenario():
            long_request = engine.make_request(PROMPTS[0], greedy(100))
            stream = engine.stream(long_request)
            got = []
            async for output in stream:
                got.append(output)
                if len(got) == 3:
                    stream.abort()
                    break
            deadline = time.monotonic() + 5
            while engine.num_running and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert engine.num_running == 0, "abort must free the row"
            assert long_request.finish_reason == "abort"
            assert len(long_request.output_token_ids) < 100

            # 3 x max_batch concurrent requests through the thread, all complete
            async def one(prompt):
                outs = [o async for o in engine.stream(engine.make_request(prompt, greedy(8)))]
                return outs[-1]
            finals = await asyncio.gather(*(one(PROMPTS[i % 5]) for i in range(6)))
            assert all(f.finished and f.completion_tokens == 8 for f in finals)

        asyncio.run(scenario())
        assert threading.current_thread() is threading.main_thread()
    finally:
        engine.shutdown()


def test_batched_prefill_matches_one_prompt_at_a_time(loaded):
    """Prompts of different lengths prefilled in one padded forward give each row its own logits."""
    engine = make_engine(loaded, max_batch=len(PROMPTS))
    starts = [0] * len(PROMPTS)
    batched = engine.runner.prefill(0, PROMPTS, starts)
    for row, prompt in enumerate(PROMPTS):
        alone = engine.runner.prefill(row, [prompt], [0])[0]
        torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("max_prefill_tokens", [1, 45, 2048])
def test_admitted_together_equals_solo_whatever_the_prefill_grouping(loaded, max_prefill_tokens):
    """All prompts arrive at once: however they are split into prefill forwards, each output equals its solo
    output; a request that ends on its first token (freeing its row mid-admission) does not disturb the others."""
    lengths = [12, 1, 9, 15, 1]
    expected = [solo(loaded, p, greedy(n)) for p, n in zip(PROMPTS, lengths)]
    engine = make_engine(loaded, max_batch=5, max_prefill_tokens=max_prefill_tokens)
    requests = [Request(p, greedy(n)) for p, n in zip(PROMPTS, lengths)]
    engine.generate(requests)
    assert [r.output_token_ids for r in requests] == expected
    assert engine.num_running == 0


def test_prefill_near_the_end_of_the_cache(loaded):
    """A prompt that fills almost the whole cache row is prefilled beside a short one without overflowing."""
    long_prompt = list(range(3, 3 + 150))
    expected = [solo(loaded, p, greedy(n)) for p, n in ((long_prompt, 8), (PROMPTS[0], 8))]
    engine = make_engine(loaded, max_batch=2)
    requests = [Request(long_prompt, greedy(8)), Request(PROMPTS[0], greedy(8))]
    engine.generate(requests)
    assert [r.output_token_ids for r in requests] == expected


@pytest.mark.parametrize("max_prefill_tokens", [7, 2048])
def test_prompt_logprobs_equal_the_reference_forward(loaded, tiny_checkpoints, max_prefill_tokens):
    """echo-style scoring: each prompt token's logprob under HF's forward, computed in the (chunked, batched)
    prefill; a row that does not ask is unaffected; max_tokens=0 only scores."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()
    engine = make_engine(loaded, max_prefill_tokens=max_prefill_tokens)
    scored = [Request(PROMPTS[1], greedy(3, prompt_logprobs=2)), Request(PROMPTS[3], greedy(0, prompt_logprobs=0))]
    plain = Request(PROMPTS[2], greedy(3))
    outputs = engine.generate([scored[0], plain, scored[1]])
    for request in scored:
        first = outputs[request.request_id][0]
        with torch.inference_mode():
            reference = torch.log_softmax(hf(torch.tensor([request.prompt_token_ids])).logits[0].float(), -1)
        entries = first.prompt_logprobs
        assert len(entries) == len(request.prompt_token_ids) and entries[0] is None
        for position, entry in enumerate(entries[1:], start=1):
            expected = reference[position - 1]
            assert entry.token_id == request.prompt_token_ids[position]
            assert abs(entry.logprob - float(expected[entry.token_id])) < 1e-4
            k = request.params.prompt_logprobs
            assert [t for t, _ in entry.top] == expected.topk(max(k, 1)).indices[:k].tolist()
    assert outputs[scored[1].request_id][-1].finish_reason == "length" and scored[1].output_token_ids == []
    assert len(outputs[scored[1].request_id]) == 1
    assert all(o.prompt_logprobs is None for o in outputs[plain.request_id])
    assert scored[0].output_token_ids == solo(loaded, PROMPTS[1], greedy(3))
    assert plain.output_token_ids == solo(loaded, PROMPTS[2], greedy(3))
