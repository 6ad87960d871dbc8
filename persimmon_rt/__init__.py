"""persimmon_rt: fast, faithful inference for the Persimmon decoder family.

Public names follow transformers (PersimmonConfig, PersimmonForCausalLM, ...). Submodules are imported
on first use so `import persimmon_rt` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "PersimmonConfig": "config",
    "ConfigError": "config",
    "PersimmonModel": "model",
    "PersimmonForCausalLM": "model",
    "PersimmonForSequenceClassification": "model",
    "PersimmonForTokenClassification": "model",
    "PersimmonPreTrainedModel": "model",
    "PersimmonTokenizer": "tokenizer",
    "convert_adept_checkpoint": "convert",
    "CheckpointError": "weights",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'persimmon_rt' has no attribute {name!r}")


def __dir__():
    return __all__
