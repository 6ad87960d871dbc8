"""`persimmon-rt serve` on a tiny random Fuyu (CPU): chat requests with OpenAI image content parts (base64
data URLs) through the real server, each equal to `Engine.generate` on the same image and prompt; and the
image errors, each a 400 naming the problem."""

import asyncio
import base64
import io
import json
import struct
import zlib

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("PIL")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

from fuyu_utils import random_image, write_model, write_tokenizer  # noqa: E402
from serve_utils import InProcessServer  # noqa: E402

from persimmon_rt.engine import Engine  # noqa: E402
from persimmon_rt.serving import create_app  # noqa: E402
from persimmon_rt.serving.openai_format import token_bytes  # noqa: E402

MODEL = "fuyu"
PROMPT = "Describe this picture.\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("fuyu_serve"))
    write_tokenizer(directory)
    write_model(directory)
    return directory


def fuyu_engine(model_dir, rows: int) -> Engine:
    return Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu", max_batch_size=rows, max_seq_len=64)


@pytest.fixture(scope="module")
def reference(model_dir):
    return fuyu_engine(model_dir, 1)


@pytest.fixture(scope="module")
def server(model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A budget of 8 tokens per step: an image prompt (about 30 tokens) joins a running decode in pieces.
    app = create_app(fuyu_engine(model_dir, 2), model_name=MODEL, max_queue=8, prefill_budget=8)
    with InProcessServer(app) as s:
        yield s
    torch.set_num_threads(threads)


def png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def chat(*parts, **fields) -> dict:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8,
            **fields}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def expected(reference, image, prompt=PROMPT, n=8):
    result = reference.generate([prompt], images=None if image is None else [image], max_new_tokens=n,
                                temperature=0.0)
    ids = result.token_ids[0]
    return result.texts[0], ids, result.finish_reasons[0]


# ---------------------------------------------------------------------------------------------- outputs
def test_image_chat_equals_engine_generate(server, reference):
    image = random_image(90, 120, seed=8)
    text, ids, reason = expected(reference, image)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json=chat(PROMPT, image_part(data_url(png(image))), logprobs=True))
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (text, reason)
    # Token by token (a stop token has no log-probability entry), spelled by the Fuyu tokenizer.
    shown = ids[:-1] if reason == "stop" else ids
    tokenizer = reference.tokenizer
    assert [e["bytes"] for e in choice["logprobs"]["content"]] == [list(token_bytes(tokenizer, t)) for t in shown]
    prompt_ids, patches = reference.images.prompt(PROMPT, image)
    assert patches.shape[0] == 12                        # 90 x 120: 3 x 4 patches, in the prompt's count
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                            "total_tokens": len(prompt_ids) + len(ids)}


def test_concurrent_image_chats_streamed_each_equal_alone(server, reference):
    """Two image prompts and a text-only one at once (two rows): rows join a running decode, the image
    prompts prefilled in 8-token pieces, and the image part may come before the text."""
    images = [random_image(60, 100, seed=11), random_image(90, 40, seed=12), None]
    prompts = ["What is it", "The king", "No picture here"]

    async def one(client, image, prompt):
        parts = (prompt,) if image is None else (image_part(data_url(png(image))), prompt)
        async with client.stream("POST", server.url + "/v1/chat/completions", json=chat(*parts, stream=True)) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return "".join(c["delta"].get("content", "") for d in data[:-1] for c in json.loads(d)["choices"])

    async def all_at_once():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, im, p) for im, p in zip(images, prompts)))

    texts = asyncio.run(all_at_once())
    assert texts == [expected(reference, im, p)[0] for im, p in zip(images, prompts)]


# ----------------------------------------------------------------------------------------------- errors
def zero_width_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)          # width 0, height 5, 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


URL = "messages[0].content[1].image_url.url"
PART = "messages[0].content[1]"
GOOD = data_url(png(random_image(30, 30, seed=1)))
BAD = [  # (body, the param named, words in the message)
    (chat(PROMPT, image_part("https://example.com/cat.png")), URL, "not fetched"),
    (chat(PROMPT, image_part("http://example.com/cat.png")), URL, "no network requests"),
    (chat(PROMPT, image_part("file:///etc/hostname")), URL, "base64 data URL"),
    (chat(PROMPT, image_part("data:image/png,rawbytes")), URL, "only base64"),
    (chat(PROMPT, image_part("data:text/plain;base64,aGk=")), URL, "image/"),
    (chat(PROMPT, image_part("data:image/png;base64,@@@@")), URL, "not valid base64"),
    (chat(PROMPT, image_part("data:image/png;base64,")), URL, "empty (0 bytes)"),
    (chat(PROMPT, image_part(data_url(b"this is not an image"))), PART, "cannot read image"),
    (chat(PROMPT, image_part(data_url(zero_width_png()))), PART, "cannot read image"),
    (chat(PROMPT, image_part(GOOD), image_part(GOOD)), "messages[0].content[2]", "at most one image"),
    (chat(PROMPT, {"type": "image_url", "image_url": "https://example.com/cat.png"}), PART, "'url'"),
    (chat(PROMPT, {"type": "input_audio", "input_audio": {}}), PART, "unsupported content part type"),
    ({**chat(PROMPT), "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                   {"role": "user", "content": [image_part(GOOD)]}]}, "messages",
     "one user message"),
]


@pytest.mark.parametrize("body, param, words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_images_are_a_400_naming_the_problem(server, body, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
