"""`persimmon-rt serve` on the demo model (CPU): a real server on 127.0.0.1, driven by the official OpenAI
client and by raw HTTP; greedy outputs checked against `Engine.generate` on the same prompts."""

import asyncio

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from persimmon_rt.scheduler import Scheduler  # noqa: E402
from persimmon_rt.serving import create_app  # noqa: E402
from persimmon_rt.serving.protocol import CHAT_TURN_END  # noqa: E402

from serve_utils import MODEL, InProcessServer, demo_engine, metric, metric_samples, sse_events  # noqa: E402

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING HENRY:\nOnce more unto the breach",
           "To be, or not to be", "JULIET:\nO Romeo, Romeo!", "HAMLET:", "What light through yonder window",
           "Friends, Romans, countrymen"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The demo model's ops are tiny: one intra-op thread is faster, and fair to a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """A second engine, for `Engine.generate` on each prompt alone."""
    return demo_engine(max_batch_size=1)


@pytest.fixture(scope="module")
def server(one_thread):
    app = create_app(demo_engine(max_batch_size=8), model_name=MODEL, max_queue=64, prefill_budget=16)
    with InProcessServer(app) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def alone(reference, prompt, max_tokens, **kwargs):
    result = reference.generate([prompt], max_new_tokens=max_tokens, temperature=0.0, **kwargs)
    return result.texts[0], result.token_ids[0], result.finish_reasons[0]


# ----------------------------------------------------------------------------------- the OpenAI client
def test_completions_equal_engine_generate(client, reference):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=20, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, out.choices):
        text, ids, reason = alone(reference, prompt, 20)
        assert choice.text == text and choice.finish_reason == reason
    prompt_tokens = sum(len(reference.tokenizer.encode(p)) for p in PROMPTS[:3])
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == 60
    ids = reference.tokenizer.encode(PROMPTS[3])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == alone(reference, PROMPTS[3], 12)[0]


def test_streamed_completion_equals_engine_generate(client, reference):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=24, temperature=0,
                                            stream=True))
    text, _, reason = alone(reference, PROMPTS[4], 24)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    assert chunks[-1].usage.completion_tokens == 24 and all(c.usage is None for c in chunks[:-1])


def test_chat_equals_engine_generate_on_the_chat_template(client, reference):
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    prompt = reference.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Speak as a king.\n\nWho goes there?"}])
    assert prompt == "human: Speak as a king.\n\nWho goes there?\n\nadept:"
    text, ids, reason = alone(reference, prompt, 30, stop_strings=[CHAT_TURN_END])
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == reason and out.usage.completion_tokens == len(ids)
    assert out.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_logprobs_are_the_engines(client, reference):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=0, logprobs=3)
    expected = list(reference.generate([PROMPTS[5]], max_new_tokens=8, logprobs=3, stream=True))
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for event, chosen, top in zip(expected, lp.token_logprobs, lp.top_logprobs):
        assert chosen == pytest.approx(event.logprob, abs=1e-5) and len(top) <= 3
        assert max(top.values()) == pytest.approx(event.top_logprobs[0][1], abs=1e-5)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hail!"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) <= 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_n_stop_and_sampling_parameters(client, reference):
    out = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, temperature=0, n=2, stop=["\n\n"])
    text, _, _ = alone(reference, "ROMEO:", 30, stop_strings=["\n\n"])
    assert [c.text for c in out.choices] == [text, text] and "\n\n" not in text
    assert out.choices[0].finish_reason == "stop"
    sampled = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=6, temperature=0.8, top_p=0.9,
                                        seed=7, extra_body={"top_k": 20})
    assert sampled.usage.completion_tokens <= 6 and sampled.choices[0].finish_reason in ("stop", "length")


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


# ------------------------------------------------------------------------------------------ concurrency
async def _stream(client, i: int):
    prompt, max_tokens = PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 4 + (i * 7) % 29
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [e async for e in _aiter_sse(response)]
    assert events[-1] == "[DONE]"
    ids = {e["id"] for e in events[:-1]}
    assert len(ids) == 1
    return prompt, max_tokens, ids.pop(), "".join(e["choices"][0]["text"] for e in events[:-1]), \
        events[-2]["choices"][0]["finish_reason"]


async def _aiter_sse(response):
    import json

    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])


def test_32_concurrent_streams_each_equal_to_alone(server, reference):
    before = metric(server.url, "persimmon_rt_generation_tokens_total")

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(_stream(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len({r[2] for r in results}) == 32                      # none lost, none duplicated
    generated = 0
    for prompt, max_tokens, _, text, reason in results:
        expected, ids, expected_reason = alone(reference, prompt, max_tokens)
        assert (text, reason) == (expected, expected_reason), prompt
        generated += len(ids)
    assert metric(server.url, "persimmon_rt_generation_tokens_total") - before == generated


def test_a_client_that_leaves_mid_stream_frees_its_row(server, reference):
    cancelled = metric(server.url, "persimmon_rt_sequences_total", reason="cancelled")
    body = {"model": MODEL, "prompt": "HAMLET:", "max_tokens": 200, "temperature": 0, "stream": True}
    other = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            async def leave():
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            break                 # leave after the first chunk: the connection closes
            async def stay():
                async with client.stream("POST", "/v1/completions", json=other) as response:
                    return [e async for e in _aiter_sse(response)]
            return (await asyncio.gather(leave(), stay()))[1]

    events = asyncio.run(run())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == alone(reference, PROMPTS[1], 40)[0]
    assert _eventually(lambda: metric(server.url, "persimmon_rt_rows_in_use") == 0)
    assert metric(server.url, "persimmon_rt_sequences_total", reason="cancelled") == cancelled + 1


def _eventually(check, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


# -------------------------------------------------------------------------------------- faults, metrics
def test_a_failing_step_answers_500_and_the_server_goes_on(server, client, reference, monkeypatch):
    real_step, failures = Scheduler.step, []

    def step(self):
        if not failures and any(h is not None for h in self.rows):
            failures.append(1)
            raise RuntimeError("injected fault")
        return real_step(self)

    monkeypatch.setattr(Scheduler, "step", step)
    response = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    out = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=8, temperature=0)
    assert out.choices[0].text == alone(reference, "ROMEO:", 8)[0]
    failures.clear()                                   # once more, streaming: an error event, then [DONE]
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        events = sse_events(response)
    assert "injected fault" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    assert metric(server.url, "persimmon_rt_step_failures_total") == 2
    assert metric(server.url, "persimmon_rt_sequences_total", reason="error") == 2
    assert client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=8, temperature=0).choices[0].text \
        == out.choices[0].text


def test_a_client_that_leaves_before_a_whole_answer_frees_its_row(server):
    cancelled = metric(server.url, "persimmon_rt_sequences_total", reason="cancelled")
    body = {"model": MODEL, "prompt": "HAMLET:", "max_tokens": 240, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.2)
    assert _eventually(lambda: metric(server.url, "persimmon_rt_sequences_total", reason="cancelled")
                       == cancelled + 1)
    assert _eventually(lambda: metric(server.url, "persimmon_rt_rows_in_use") == 0)
    assert _eventually(lambda: metric(server.url, "persimmon_rt_http_requests_total", endpoint="/v1/completions",
                                      status="499") == 1)


def test_metrics_parse_as_prometheus_text(server):
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    names = {name for name, _ in samples}
    for name in ("persimmon_rt_prompt_tokens_total", "persimmon_rt_generation_tokens_total",
                 "persimmon_rt_time_to_first_token_seconds_bucket", "persimmon_rt_inter_token_latency_seconds_count",
                 "persimmon_rt_queue_depth", "persimmon_rt_rows_in_use", "persimmon_rt_rows"):
        assert name in names, name
    assert samples[("persimmon_rt_rows", frozenset())] == 8
    assert samples[("persimmon_rt_http_requests_total",
                    frozenset({"endpoint": "/v1/completions", "status": "200"}.items()))] > 0
    first = samples[("persimmon_rt_time_to_first_token_seconds_count", frozenset())]
    assert first >= sum(v for (n, labels), v in samples.items() if n == "persimmon_rt_sequences_total"
                        and dict(labels)["reason"] in ("stop", "length"))
