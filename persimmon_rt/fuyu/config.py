"""`FuyuConfig`: transformers' Fuyu fields, with the decoder's settings held as a PersimmonConfig."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, PersimmonConfig

CONFIG_NAME = "config.json"
# Fields transformers copies into text_config when a Fuyu config.json has none.
_TEXT_KEYS = ("vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "hidden_act", "initializer_range", "layer_norm_eps", "use_cache",
              "rope_parameters", "rope_theta", "partial_rotary_factor", "qk_layernorm", "hidden_dropout",
              "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id")


@dataclass
class FuyuConfig:
    text_config: PersimmonConfig = field(default_factory=PersimmonConfig)
    image_size: int = 300
    patch_size: int = 30
    num_channels: int = 3
    image_token_id: int = 71011
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)      # other keys, written back unchanged
    model_type = "fuyu"

    def __getattr__(self, name: str):
        # Decoder settings (eos_token_id, vocab_size, rope_type, ...) read through to text_config, as
        # the module-level generate loop expects them on `model.config`.
        if name.startswith("__") or name in ("text_config", "extra"):
            raise AttributeError(name)
        return getattr(self.text_config, name)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FuyuConfig":
        data = copy.deepcopy(data)
        if data.pop("model_type", "fuyu") != "fuyu":
            raise ConfigError("not a Fuyu config (model_type is not 'fuyu')")
        text = data.pop("text_config", None)
        if text is None:
            text = {k: data[k] for k in _TEXT_KEYS if k in data}
        text = {k: v for k, v in text.items() if v is not None or k == "pad_token_id"}
        text.setdefault("model_type", "persimmon")
        mine = {k: data.pop(k) for k in ("image_size", "patch_size", "num_channels", "image_token_id",
                                          "initializer_range", "tie_word_embeddings") if k in data}
        return cls(text_config=PersimmonConfig.from_dict(text), **mine, extra=data)

    def to_dict(self) -> dict[str, Any]:
        text = self.text_config.to_dict()
        # transformers reads the top-level copies too (hidden_size sizes vision_embed_tokens).
        out = {**self.extra, **{k: text[k] for k in _TEXT_KEYS if k in text}}
        out.update(model_type="fuyu", text_config=text, image_size=self.image_size,
                   patch_size=self.patch_size, num_channels=self.num_channels, image_token_id=self.image_token_id,
                   initializer_range=self.initializer_range, tie_word_embeddings=self.tie_word_embeddings)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "FuyuConfig":
        file = os.path.join(os.fspath(path), CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(path)!r} (expected an HF-format model directory)")
        with open(file, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)


def is_fuyu_dir(path: str | os.PathLike) -> bool:
    """Whether `path/config.json` describes a Fuyu model."""
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh).get("model_type") == "fuyu"
    except (OSError, ValueError, AttributeError):
        return False
