"""ph2p-lit: prompt inversion (PH2P) for Stable-Diffusion-class models on PyTorch Lightning."""

from .api import invert, reconstruct
from .backbone import Backbone
from .data import ImageDataModule
from .inversion import PromptInversion
from .sampler import TimestepSampler
from .vocab import Vocabulary

__all__ = ["invert", "reconstruct", "Backbone", "ImageDataModule", "PromptInversion", "TimestepSampler", "Vocabulary"]
