"""ph2p-lit: prompt inversion (PH2P) for Stable-Diffusion-class models on PyTorch Lightning."""

import importlib

# Each public name and the module that defines it, imported on first use (PEP 562): importing the
# package, as `ph2p --help` does, must not load torch, Lightning and diffusers (seconds each).
_EXPORTS = {
    "invert": "api",
    "reconstruct": "api",
    "Backbone": "backbone",
    "ImageDataModule": "data",
    "PromptInversion": "inversion",
    "TimestepSampler": "sampler",
    "Vocabulary": "vocab",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
