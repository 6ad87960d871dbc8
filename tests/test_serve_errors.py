"""The server's answers to bad input and to load: OpenAI-format errors naming the problem, 429 with
Retry-After on a full queue, and the command's one-line refusals."""

import asyncio

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from persimmon_rt import cli  # noqa: E402
from persimmon_rt.serving import create_app  # noqa: E402

from serve_utils import MAX_SEQ_LEN, MODEL, InProcessServer, StepGate, demo_engine, metric  # noqa: E402


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(demo_engine(max_batch_size=1), model_name=MODEL, max_queue=1)
    with InProcessServer(app) as s:
        yield s
    torch.set_num_threads(threads)


def completion(**fields):
    return {"model": MODEL, "prompt": "ROMEO:", **fields}


def chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hail!"}], **fields}


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
BAD = [  # (route, body, status, the param named, words in the message)
    ("/v1/completions", "{not json", 400, None, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "'prompt' is required"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "'model' is required"),
    ("/v1/completions", completion(model="gpt-4"), 404, "model", "does not exist"),
    ("/v1/completions", completion(max_tokens="16"), 400, "max_tokens", "must be an integer"),
    ("/v1/completions", completion(max_tokens=0), 400, "max_tokens", ">= 1"),
    ("/v1/completions", completion(temperature=-1), 400, "temperature", "[0, 2]"),
    ("/v1/completions", completion(temperature="hot"), 400, "temperature", "must be a number"),
    ("/v1/completions", completion(top_p=0), 400, "top_p", "(0, 1]"),
    ("/v1/completions", completion(top_k=2.5), 400, "top_k", "must be an integer"),
    ("/v1/completions", completion(n=0), 400, "n", "between 1 and"),
    ("/v1/completions", completion(n=True), 400, "n", "must be an integer"),
    ("/v1/completions", completion(stream="yes"), 400, "stream", "must be a boolean"),
    ("/v1/completions", completion(stop=5), 400, "stop", "non-empty string"),
    ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    ("/v1/completions", completion(logprobs=6), 400, "logprobs", "between 0 and 5"),
    ("/v1/completions", completion(seed="x"), 400, "seed", "must be an integer"),
    ("/v1/completions", completion(presence_penalty=0.5), 400, "presence_penalty", "not supported"),
    ("/v1/completions", completion(repetition_penalty=1.1), 400, "repetition_penalty", "unrecognized"),
    ("/v1/chat/completions", chat(prompt="x"), 400, "prompt", "unrecognized"),
    ("/v1/completions", completion(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    ("/v1/completions", completion(prompt=[]), 400, "prompt", "must be a string"),
    ("/v1/completions", completion(prompt=[1, "a"]), 400, "prompt", "must be a string"),
    ("/v1/completions", completion(prompt=[10**6]), 400, "prompt", "token ids must be in"),
    ("/v1/completions", '{"model": "demo", "prompt": "\\ud800"}', 400, "prompt", "cannot tokenize"),
    ("/v1/completions", completion(max_tokens=MAX_SEQ_LEN), 400, "prompt", "maximum context length"),
    ("/v1/completions", completion(prompt="ROMEO: " * 200), 400, "prompt", "maximum context length"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "'messages' is required"),
    ("/v1/chat/completions", chat(messages=[]), 400, "messages", "non-empty array"),
    ("/v1/chat/completions", chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role", "role"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     "must be a string"),
    ("/v1/chat/completions", chat(logprobs=3), 400, "logprobs", "must be a boolean"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hail!"}, IMAGE]}]),
     400, "messages[0].content[1]", "text-only"),
    ("/v1/chat/completions", chat(messages=[{"role": "assistant", "content": [IMAGE]}]), 400, "messages[0].content[0]",
     "only allowed in user messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400,
     "messages[0].content[0]", "'messages[0].content[0].text' must be a string"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": ["Hail!"]}]), 400, "messages[0].content[0]",
     "must be a content part"),
    ("/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs", "needs 'logprobs'"),
    ("/v1/chat/completions", chat(max_completion_tokens=MAX_SEQ_LEN), 400, "messages", "maximum context length"),
]


@pytest.mark.parametrize("route, body, status, param, words", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_an_openai_error_naming_the_problem(server, route, body, status, param, words):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(server.url + route, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    if status == 404:
        assert error["code"] == "model_not_found"
    if "context length" in words:
        assert error["code"] == "context_length_exceeded"


def test_neutral_and_bookkeeping_fields_are_accepted(server):
    body = completion(max_tokens=2, user="u1", metadata={"k": "v"}, presence_penalty=0, echo=False, best_of=1)
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200


def test_unknown_routes_and_methods_answer_in_the_openai_format(server):
    missing = httpx.get(server.url + "/v1/engines")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(server.url + "/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_the_official_client_raises_its_own_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=3)


@pytest.fixture
def one_row_server():
    """One row, one queue place, and a gate on the scheduler's steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = demo_engine(max_batch_size=1)
    gate = StepGate(engine)
    with InProcessServer(create_app(engine, model_name=MODEL, max_queue=1)) as s:
        yield s, gate
        gate.open()
    torch.set_num_threads(threads)


def test_a_full_queue_answers_429_with_retry_after(one_row_server):
    """A running stream holds the only row, a second request waits, the third is refused; when the first
    client leaves, the waiting one is served. The running stream is held after a few steps (far short of its
    max_tokens), so it still holds the row when the other two arrive, however fast the machine."""
    server, gate = one_row_server
    long = completion(max_tokens=MAX_SEQ_LEN - 8, temperature=0, stream=True)
    gate.allow(16)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=long) as running:
                lines = running.aiter_lines()    # held: an abandoned line iterator may close the stream when collected
                await anext(lines)
                waiting = asyncio.ensure_future(client.post("/v1/completions", json=completion(max_tokens=3)))
                for _ in range(3000):
                    if server.state.worker.queue_depth() >= 1:
                        break
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/completions", json=completion(max_tokens=3))
                gate.open()
            return refused, await waiting

    refused, waited = asyncio.run(run())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert waited.status_code == 200 and waited.json()["usage"]["completion_tokens"] == 3
    assert metric(server.url, "persimmon_rt_http_requests_total", endpoint="/v1/completions", status="429") == 1


@pytest.mark.parametrize("flag, words", [("--quantize=int4", "int4"),
                                         ("--tp=0", "--tp must be >= 1")])
def test_serve_refuses_what_it_cannot_do_in_one_line(flag, words, capsys):
    assert cli.main(["serve", flag]) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
