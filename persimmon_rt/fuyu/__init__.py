"""Fuyu-8B: Adept's multimodal model on the Persimmon decoder (image patches -> one linear layer -> the
decoder's embedding space). Modules with transformers' names (model.py), its processor (processor.py,
image.py), and the engine front end (engine.py)."""

from .config import FuyuConfig, is_fuyu_dir
from .model import FuyuForCausalLM, FuyuModel

__all__ = ["FuyuConfig", "FuyuForCausalLM", "FuyuModel", "is_fuyu_dir"]
