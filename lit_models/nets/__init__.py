"""Backbones and their parts."""

from lit_models.nets.temporal import TemporalAttention, TemporalConv
from lit_models.nets.unet import FactorizedUNet

__all__ = ["FactorizedUNet", "TemporalAttention", "TemporalConv"]
