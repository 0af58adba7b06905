"""Backbones and their parts."""

from lit_models.nets.temporal import (
    AlphaMixed,
    SwappedCrossAttention,
    TemporalAttention,
    TemporalConv,
    TemporalShift,
)
from lit_models.nets.unet import FactorizedUNet

__all__ = [
    "AlphaMixed",
    "FactorizedUNet",
    "SwappedCrossAttention",
    "TemporalAttention",
    "TemporalConv",
    "TemporalShift",
]
