"""Fuyu on the CPU: processor, modules and engine front end against transformers 5.17 (tiny configs)."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("tokenizers")

from fuyu_utils import CANVAS, hf_processor, random_image, write_model, write_tokenizer  # noqa: E402

from persimmon_rt.fuyu import FuyuForCausalLM  # noqa: E402
from persimmon_rt.fuyu.processor import FuyuProcessor  # noqa: E402

SIZES = [(50, 70), (90, 120), (200, 100), (31, 300), (7, 45), (61, 29)]      # fits, exact, tall, wide, thin
PROMPTS = ["Describe this picture.\n", "What is it", "The king"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("fuyu"))
    write_tokenizer(directory)
    write_model(directory)
    return directory


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import FuyuForCausalLM as HFFuyu

    return HFFuyu.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("size", SIZES)
def test_processor_matches_transformers(model_dir, size):
    images = [random_image(*size, seed=1), random_image(60, 45, seed=2)]
    texts = [PROMPTS[0], PROMPTS[1]]
    theirs = hf_processor(model_dir)(text=texts, images=images, return_tensors="pt")
    ours = FuyuProcessor.from_pretrained(model_dir)(text=texts, images=images)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["image_patches"], theirs["image_patches"].float())


def test_encoded_bytes_decode_to_the_same_pixels(model_dir):
    import io

    from PIL import Image

    from persimmon_rt.fuyu.image import load_image

    array = random_image(37, 51, seed=4)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    assert np.array_equal(load_image(buf.getvalue()), array)


def test_processor_pil_and_paths(model_dir, tmp_path):
    from PIL import Image

    array = random_image(80, 150, seed=3)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    processor = FuyuProcessor.from_pretrained(model_dir)
    a = processor(text=PROMPTS[2], images=array)
    for other in (Image.fromarray(array), str(path)):
        b = processor(text=PROMPTS[2], images=other)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["image_patches"], b["image_patches"])


def test_logits_match_transformers(model_dir, hf_model):
    images = [random_image(50, 70, seed=4), random_image(200, 100, seed=5)]
    inputs = hf_processor(model_dir)(text=PROMPTS[:2], images=images, return_tensors="pt")
    ours = FuyuForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
        got = ours(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_greedy_generate_matches_transformers(model_dir, hf_model):
    images = [random_image(90, 120, seed=6), random_image(40, 35, seed=7)]
    inputs = hf_processor(model_dir)(text=PROMPTS[:2], images=images, return_tensors="pt")
    ours = FuyuForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    got = ours.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_save_round_trip(model_dir, hf_model, tmp_path):
    from transformers import FuyuForCausalLM as HFFuyu

    FuyuForCausalLM.from_pretrained(model_dir, dtype=torch.float32).save_pretrained(tmp_path)
    reloaded = HFFuyu.from_pretrained(str(tmp_path), dtype=torch.float32)
    for (name, a), (_, b) in zip(sorted(hf_model.state_dict().items()), sorted(reloaded.state_dict().items())):
        assert torch.equal(a, b), name


def test_engine_greedy_matches_module(model_dir):
    from persimmon_rt.engine import Engine

    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu", max_batch_size=2, max_seq_len=64)
    assert engine.images is not None
    images = [random_image(90, 120, seed=8), random_image(30, 200, seed=9)]
    result = engine.generate(PROMPTS[:2], images=images, max_new_tokens=6)
    module, processor = FuyuForCausalLM.from_pretrained(model_dir, dtype=torch.float32), engine.images.processor
    for prompt, image, ids in zip(PROMPTS, images, result.token_ids):
        inputs = processor(text=prompt, images=image)
        out = module.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert ids == expected[:len(ids)] and len(ids) in (len(expected), 6)
    assert result.texts is not None and len(result.texts) == 2


def test_an_image_request_joins_a_running_decode_without_host_waits(model_dir):
    """The scheduler embeds an image request when it takes a row and prefills it in pieces between decode
    steps; nothing there would make the host wait for a GPU (sync_audit.py), and both rows produce what
    they produce alone."""
    from sync_audit import HostWaits

    from persimmon_rt.engine import Engine

    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu", max_batch_size=2, max_seq_len=64)
    image = random_image(90, 120, seed=8)
    alone = {"image": engine.generate([PROMPTS[0]], images=[image], max_new_tokens=6).token_ids[0],
             "text": engine.generate([PROMPTS[2]], max_new_tokens=12).token_ids[0]}
    ids, patches = engine.images.prompt(PROMPTS[0], image)
    requests = {"text": engine.request(PROMPTS[2], 12), "image": engine.request(ids, 6, patches=patches)}
    with engine.lock, HostWaits() as audit:
        scheduler = engine.scheduler(prefill_budget=5)
        scheduler.submit(requests["text"])
        joined = False
        while scheduler.busy() or not joined:
            if scheduler.decode_steps >= 3 and not joined:
                scheduler.submit(requests["image"])
                joined = True
            scheduler.step()
    assert audit.calls == []
    assert {k: r.output_ids for k, r in requests.items()} == alone


# ------------------------------------------------------------------------------------------------ bad input
def test_unreadable_image(model_dir, tmp_path):
    from persimmon_rt.fuyu.image import ImageError

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    processor = FuyuProcessor.from_pretrained(model_dir)
    for image, words in ((str(bad), "cannot read image"), (str(tmp_path / "missing.png"), "no image file"),
                         (np.zeros((0, 10, 3), np.uint8), "zero size"), (np.zeros((4, 4, 3), np.float32), "uint8"),
                         (b"not an image", r"cannot read image data \(12 bytes\)"), (b"", "empty")):
        with pytest.raises(ImageError, match=words) as info:
            processor(text="x", images=image)
        assert "\n" not in str(info.value)


def test_image_larger_than_canvas_without_resize(model_dir):
    from persimmon_rt.fuyu.image import ImageError

    processor = FuyuProcessor.from_pretrained(model_dir, do_resize=False)
    with pytest.raises(ImageError, match="larger than the 120x90 canvas"):
        processor(text="x", images=random_image(CANVAS["height"] + 1, 50))


def test_text_only_engine_refuses_images():
    from persimmon_rt.engine import Engine

    demo = os.path.join(os.path.dirname(__file__), "..", "persimmon_rt", "demo")
    engine = Engine.from_pretrained(demo, device="cpu", max_seq_len=32)
    with pytest.raises(ValueError, match="text-only"):
        engine.generate(["ROMEO:"], images=[random_image(10, 10)], max_new_tokens=2)
    with pytest.raises(ValueError, match="text-only"):
        engine.request([1, 2, 3], 2, patches=torch.zeros(1, 2700))


def test_patches_that_do_not_fit_the_placeholders_are_refused(model_dir):
    from persimmon_rt.engine import Engine

    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu", max_seq_len=64)
    ids, patches = engine.images.prompt("x", random_image(60, 60))
    for bad in (patches[:-1], patches[:, :-1], patches[None]):
        with pytest.raises(ValueError, match=r"image patches must be \[4 placeholders, 2700\]"):
            engine.request(ids, 2, patches=bad)
    embeds = engine.forward.embed(torch.tensor(ids))
    with pytest.raises(ValueError, match="not with input embeddings"):
        engine.request(embeds, 2, patches=patches)


# ------------------------------------------------------------------------------------------------ command line
def _cli(*argv):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    return subprocess.run([sys.executable, "-m", "persimmon_rt", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_generate_with_image_and_info(model_dir, tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.fromarray(random_image(80, 100, seed=10)).save(path)
    out = _cli("generate", "--model", model_dir, "--device", "cpu", "--image", str(path), "--temperature", "0",
               "--max-new-tokens", "4", "--json", "Describe this picture.\n")
    assert out.returncode == 0, out.stderr
    assert len(__import__("json").loads(out.stdout)["token_ids"]) >= 1
    info = _cli("info", "--model", model_dir)
    assert info.returncode == 0 and "multimodal (Fuyu)" in info.stdout
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    bad = _cli("generate", "--model", model_dir, "--device", "cpu", "--image", str(broken), "x")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "cannot read image" in bad.stderr
