"""PersimmonConfig: every field of transformers' PersimmonConfig, read from and written to HF config.json.

Reads both spellings of the rotary settings: the legacy top-level keys found on the published checkpoints
(``rope_theta``, ``partial_rotary_factor``, ``rope_scaling``) and transformers-5 ``rope_parameters``.
Writes both, so transformers 4.x and 5.x load what we save.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

CONFIG_NAME = "config.json"
ROPE_TYPES = ("default", "linear", "dynamic")
HIDDEN_ACTS = ("relu2",)


class ConfigError(ValueError):
    """A config.json (or keyword argument) that cannot describe a Persimmon model."""


@dataclass
class PersimmonConfig:
    vocab_size: int = 262144
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    hidden_act: str = "relu2"
    max_position_embeddings: int = 16384
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 25000.0
    rope_scaling: dict | None = None
    qk_layernorm: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    partial_rotary_factor: float = 0.5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    torch_dtype: str | None = None
    # Keys we do not model but must carry through a load/save round trip (architectures, auto_map, ...).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "persimmon"

    def __post_init__(self):
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        else:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Number of leading dims of each head that are rotated (int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def dtype(self):
        """The torch dtype the checkpoint was saved in, or None."""
        import torch

        return None if self.torch_dtype is None else getattr(torch, str(self.torch_dtype).replace("torch.", ""))

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"invalid PersimmonConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
             f"({self.num_attention_heads})")
        need(self.hidden_act in HIDDEN_ACTS, f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        need(0.0 < self.partial_rotary_factor <= 1.0,
             f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        need(self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
             f"rotary dims int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be positive and even")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta!r}")
        need(self.layer_norm_eps > 0, f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            need(value is None or 0 <= value < self.vocab_size,
                 f"{name} must be None or in [0, vocab_size={self.vocab_size}), got {value!r}")
        for eos in self.eos_token_ids:
            need(0 <= eos < self.vocab_size, f"eos_token_id {eos} outside [0, vocab_size={self.vocab_size})")
        need(self.problem_type in (None, "regression", "single_label_classification",
                                   "multi_label_classification"), f"unknown problem_type {self.problem_type!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ------------------------------------------------------------------------------------------ dict / json
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides) -> "PersimmonConfig":
        data = {**copy.deepcopy(data), **overrides}
        model_type = data.pop("model_type", "persimmon")
        if model_type != "persimmon":
            raise ConfigError(f"config.json describes model_type {model_type!r}, not 'persimmon'")
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters:
            # transformers 5 keeps rope_theta / partial_rotary_factor / scaling together in one dict, which
            # wins over the top-level keys (it also writes a stale top-level partial_rotary_factor of 0.5).
            if "rope_theta" in rope_parameters:
                data["rope_theta"] = rope_parameters["rope_theta"]
            if "partial_rotary_factor" in rope_parameters:
                data["partial_rotary_factor"] = rope_parameters["partial_rotary_factor"]
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            data["rope_scaling"] = (None if rope_type == "default"
                                    else {"rope_type": rope_type, "factor": rope_parameters.get("factor")})
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        data.pop("dtype", None)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if out["torch_dtype"] is None:
            del out["torch_dtype"]
        else:
            out["dtype"] = out["torch_dtype"]  # transformers 5 spelling
        if out["classifier_dropout"] is None:
            del out["classifier_dropout"]
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                           "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_scaling is not None:
            rope_parameters["factor"] = self.rope_scaling["factor"]
            out["rope_scaling"] = {"type": self.rope_type, "rope_type": self.rope_type,
                                   "factor": self.rope_scaling["factor"]}
        out["rope_parameters"] = rope_parameters
        out["model_type"] = self.model_type
        return {**self.extra, **out}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "PersimmonConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "PersimmonConfig":
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r} (expected an HF-format model directory)")
        config = cls.from_json_file(file)
        if overrides:
            config = cls.from_dict({**config.to_dict(), **overrides})
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())

    # --------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "PersimmonConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _normalise_rope_scaling(scaling: dict) -> dict:
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a dict like {{'type': 'linear', 'factor': 2.0}}, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return None
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1.0:
        raise ConfigError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
    return {"rope_type": rope_type, "factor": float(factor)}


PRESETS: dict[str, dict[str, Any]] = {
    # The published Persimmon-8B (base and chat) and the backbone of Fuyu-8B.
    "persimmon-8b": {},
    # A tiny model with the same head_dim/rotary split as the 8B, for tests and smoke runs.
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=512),
}
