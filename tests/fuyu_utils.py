"""Tiny Fuyu fixtures: a SentencePiece vocabulary with Fuyu's special pieces, written as a tokenizer.json
that tokenizes like the published one (a leading U+2581 prepended to the text, |SPEAKER| / |NEWLINE| /
<0x04> as ordinary pieces), and a random transformers FuyuForCausalLM saved beside it."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import sentencepiece as spm
import torch

from persimmon_rt.tokenizer import PersimmonTokenizer

DATA = os.path.join(os.path.dirname(__file__), "data", "heldout.txt")
SPECIAL = ["|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|", "<0x04>", "\n"]
CANVAS = {"height": 90, "width": 120}          # 3 x 4 patches at most: tiny prompts


def write_tokenizer(directory: str) -> None:
    lines = [line.strip() for line in open(DATA, encoding="utf-8") if line.strip()][:300]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300,
                                   model_type="unigram", user_defined_symbols=SPECIAL, add_dummy_prefix=True,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    model_file = os.path.join(directory, "sp.model")
    with open(model_file, "wb") as fh:
        fh.write(buf.getvalue())
    PersimmonTokenizer(model_file, eos_token="|ENDOFTEXT|").save_pretrained(directory)
    os.remove(os.path.join(directory, "tokenizer.model"))         # the Hub's Fuyu ships tokenizer.json only
    path = os.path.join(directory, "tokenizer.json")
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    doc["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    doc["pre_tokenizer"] = None
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] not in SPECIAL[1:]]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    with open(os.path.join(directory, "preprocessor_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"size": CANVAS, "patch_size": {"height": 30, "width": 30}}, fh)


def hf_config(**overrides):
    from transformers import FuyuConfig

    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256, patch_size=30, image_token_id=4,
                    pad_token_id=0, bos_token_id=1, eos_token_id=3)
    return FuyuConfig(**{**settings, **overrides})


def write_model(directory: str, seed: int = 0):
    """A random transformers FuyuForCausalLM (fp32) saved into `directory`; returns it."""
    from transformers import FuyuForCausalLM

    torch.manual_seed(seed)
    model = FuyuForCausalLM(hf_config()).eval()
    with torch.no_grad():                       # larger than the init so logits are not all near ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    return model


def hf_processor(directory: str, **image_kwargs):
    from transformers import FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return FuyuProcessor(image_processor=FuyuImageProcessorPil(size=CANVAS, **image_kwargs),
                         tokenizer=TokenizersBackend.from_pretrained(directory))


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
