"""`FuyuImageProcessor` and `FuyuProcessor`: images + text -> input_ids, attention_mask, image_patches,
laid out as transformers' FuyuProcessor lays them out:

    per image row: |SPEAKER| x columns, |NEWLINE|      (the image placeholders and the image-newline)
    then <s>, the prompt's tokens, <0x04> (beginning of answer)

A batch is left-padded with id 0; `image_patches` holds every image's patches, in batch order, one row per
|SPEAKER| token.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .image import ImageError, fitted_size, image_patches, load_image

IMAGE_TOKEN, NEWLINE_TOKEN, BOS_TOKEN, ANSWER_TOKEN = "|SPEAKER|", "|NEWLINE|", "<s>", "<0x04>"


class FuyuImageProcessor:
    """Fit into the canvas (`size`), pad to whole patches, normalise to [-1, 1], cut into patches."""

    def __init__(self, size: dict | None = None, patch_size: dict | None = None, do_resize: bool = True):
        size = size or {"height": 1080, "width": 1920}
        patch_size = patch_size or {"height": 30, "width": 30}
        self.canvas = (int(size["height"]), int(size["width"]))
        self.patch = (int(patch_size["height"]), int(patch_size["width"]))
        self.do_resize = do_resize

    def __call__(self, image) -> tuple[np.ndarray, int, int]:
        """(patches [rows * cols, patch_dim] float32, rows, cols) of one image."""
        array = load_image(image)
        height, width = array.shape[:2]
        if not self.do_resize and fitted_size(height, width, self.canvas) != (height, width):
            raise ImageError(f"image {width}x{height} is larger than the {self.canvas[1]}x{self.canvas[0]} canvas "
                             "(resizing is off)")
        return image_patches(array, self.canvas, self.patch)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder + newline tokens an image of this size becomes."""
        h, w = fitted_size(height, width, self.canvas) if self.do_resize else (height, width)
        rows, cols = -(-h // self.patch[0]), -(-w // self.patch[1])
        return rows * (cols + 1)


class FuyuProcessor:
    def __init__(self, image_processor: FuyuImageProcessor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, NEWLINE_TOKEN, BOS_TOKEN, ANSWER_TOKEN)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} token: not a Fuyu tokenizer")
        self.image_token_id, self.image_newline_id = ids[IMAGE_TOKEN], ids[NEWLINE_TOKEN]
        self.bos_id, self.answer_id = ids[BOS_TOKEN], ids[ANSWER_TOKEN]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **image_kwargs) -> "FuyuProcessor":
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(os.fspath(path))
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {os.fspath(path)}")
        return cls(FuyuImageProcessor(**_preprocessor_settings(path), **image_kwargs), tokenizer)

    def sample_ids(self, text: str, image=None) -> tuple[list[int], np.ndarray | None]:
        """One prompt's token ids and its image's patches (None without an image)."""
        if image is None:
            return self.tokenizer.encode(text), None
        patches, rows, cols = self.image_processor(image)
        ids = ([self.image_token_id] * cols + [self.image_newline_id]) * rows + [self.bos_id]
        ids += self.tokenizer.encode(text + ANSWER_TOKEN, add_special_tokens=False)
        return ids, patches

    def __call__(self, text=None, images=None, return_tensors: str = "pt") -> dict:
        """input_ids and attention_mask [B, L] (left-padded with 0), image_patches [N, patch_dim] float32.
        `text` and `images` are one each or lists of the same length (an image per prompt)."""
        texts = [text] if isinstance(text, str) else list(text if text is not None else [""])
        if images is None:
            images = [None] * len(texts)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(images)} images: give one image per prompt")
        samples = [self.sample_ids(t, im) for t, im in zip(texts, images)]
        width = max(len(ids) for ids, _ in samples)
        input_ids = torch.zeros(len(samples), width, dtype=torch.long)
        attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
        for row, (ids, _) in enumerate(samples):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        patches = [p for _, p in samples if p is not None]
        if patches:
            out["image_patches"] = torch.from_numpy(np.concatenate(patches))
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]


def _preprocessor_settings(path) -> dict:
    """size / patch_size from preprocessor_config.json when the directory has one."""
    import json

    file = os.path.join(os.fspath(path), "preprocessor_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as fh:
        data = json.load(fh)
    return {k: data[k] for k in ("size", "patch_size", "do_resize") if k in data}
