"""Fuyu's image pipeline on numpy arrays: load, fit inside the canvas, pad, normalise, cut into patches.

Pillow does the decoding (PNG, JPEG, WebP, ...) and the bilinear resize, because transformers' Fuyu image
processor resizes with Pillow: using the same resampler keeps our pixels identical to its pixels. The rest
(padding, scaling, patchify) is numpy, in the order and dtypes transformers uses, for the same reason.
"""

from __future__ import annotations

import io
import os

import numpy as np

CANVAS = (1080, 1920)        # (height, width) every image is fitted into
PATCH = (30, 30)             # (height, width) of one patch


class ImageError(ValueError):
    """An image that cannot be used (unreadable, empty, wrong shape); the message is one line."""


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("Fuyu images need Pillow: pip install 'persimmon_rt[fuyu]'") from exc
    return Image


def load_image(image) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] from a path, an encoded image's bytes (PNG, JPEG, ...), a PIL image or an
    array ([H, W], [H, W, 3|4], uint8)."""
    if isinstance(image, (str, os.PathLike)):
        image = _open(os.fspath(image))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = _decode(bytes(image))
    if hasattr(image, "convert") and hasattr(image, "size"):          # a PIL image
        if image.size[0] == 0 or image.size[1] == 0:
            raise ImageError(f"image has zero size {image.size[0]}x{image.size[1]}")
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image has zero size {array.shape[1]}x{array.shape[0]}")
    if array.dtype != np.uint8:
        raise ImageError(f"image array must be uint8 (0..255), got {array.dtype}")
    return np.ascontiguousarray(array[:, :, :3])


def _open(path: str):
    if not os.path.isfile(path):
        raise ImageError(f"no image file at {path}")
    return _read(path, path)


def _decode(data: bytes):
    if not data:
        raise ImageError("image data is empty (0 bytes)")
    return _read(io.BytesIO(data), f"data ({len(data)} bytes)")


def _read(source, name: str):
    Image = _pil()
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except Exception as exc:          # Pillow raises several types for broken files
        detail = str(exc).replace(repr(source), "").strip().splitlines()      # no "<_io.BytesIO object at 0x..>"
        raise ImageError(f"cannot read image {name}: {type(exc).__name__}: {detail[0] if detail else ''}") from None


def fitted_size(height: int, width: int, canvas=CANVAS) -> tuple[int, int]:
    """The size an image is resized to: unchanged if it fits the canvas, else scaled down (aspect kept,
    truncated to whole pixels) until it does."""
    if height <= canvas[0] and width <= canvas[1]:
        return height, width
    scale = min(canvas[0] / height, canvas[1] / width)
    return int(height * scale), int(width * scale)


def resize_to_fit(array: np.ndarray, canvas=CANVAS) -> np.ndarray:
    """[H, W, 3] uint8 scaled down into the canvas with Pillow's bilinear filter (no-op if it fits)."""
    height, width = fitted_size(array.shape[0], array.shape[1], canvas)
    if (height, width) == array.shape[:2]:
        return array
    if height == 0 or width == 0:
        raise ImageError(f"image {array.shape[1]}x{array.shape[0]} is too thin to fit the "
                         f"{canvas[1]}x{canvas[0]} canvas")
    Image = _pil()
    return np.asarray(Image.fromarray(array).resize((width, height), resample=Image.BILINEAR))


def normalise(array: np.ndarray, patch=PATCH, pad_value: int = 1) -> np.ndarray:
    """[3, H', W'] float32 in [-1, 1]: the image padded (with `pad_value`, before scaling, as transformers
    does) up to whole patches, then scaled by 1/255 and normalised with mean 0.5, std 0.5."""
    height, width = array.shape[:2]
    rows, cols = -(-height // patch[0]), -(-width // patch[1])
    chw = np.transpose(array, (2, 0, 1))
    chw = np.pad(chw, ((0, 0), (0, rows * patch[0] - height), (0, cols * patch[1] - width)),
                 mode="constant", constant_values=pad_value)
    scaled = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.float32(0.5)) / np.float32(0.5)


def patchify(chw: np.ndarray, patch=PATCH) -> np.ndarray:
    """[rows * cols, ph * pw * C] patches in row-major order, each flattened (row, column, channel)."""
    channels, height, width = chw.shape
    rows, cols = height // patch[0], width // patch[1]
    blocks = chw.reshape(channels, rows, patch[0], cols, patch[1]).transpose(1, 3, 2, 4, 0)
    return np.ascontiguousarray(blocks.reshape(rows * cols, patch[0] * patch[1] * channels))


def image_patches(image, canvas=CANVAS, patch=PATCH) -> tuple[np.ndarray, int, int]:
    """(patches [rows * cols, ph * pw * 3] float32, rows, cols) of one image."""
    array = resize_to_fit(load_image(image), canvas)
    chw = normalise(array, patch)
    return patchify(chw, patch), chw.shape[1] // patch[0], chw.shape[2] // patch[1]
