"""Backbones and their parts."""

from lit_models.nets.temporal import (
    AlphaMixed,
    SpaceTimeAttention,
    SwappedCrossAttention,
    TemporalAttention,
    TemporalConv,
    TemporalShift,
)
from lit_models.nets.unet import FactorizedUNet

__all__ = [
    "AlphaMixed",
    "FactorizedUNet",
    "SpaceTimeAttention",
    "SwappedCrossAttention",
    "TemporalAttention",
    "TemporalConv",
    "TemporalShift",
]
