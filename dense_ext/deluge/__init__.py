"""DelugeNets over one shared slot buffer per stage.

Public names:
    EfficientDelugeStage       a DelugeNet stage over one channels_last slot buffer.
    EfficientDelugeTransition  CLDC -> BN -> conv3x3/2 over a stage's buffer.
    EfficientDelugeHead        CLDC -> BN -> ReLU -> global average pool over a stage's buffer.
    EfficientCLDC              the cross-layer depthwise convolution over a stage's buffer.
    EfficientCompositeLayer    holds one composite layer's modules (the stage runs it).
    EfficientPreActBottleneck  the CIFAR entry, keeping only its input for backward.
    DelugeStageFunction        the whole stage as one ``torch.autograd.Function``.
    CLDCFunction               the CLDC over a buffer as a ``torch.autograd.Function``.
    StageSpec                  a stage's static configuration.
    available_backends         stage backends that can run on a device.
"""

from dense_ext.deluge.backends import available_backends
from dense_ext.deluge.function import CLDCFunction, DelugeStageFunction
from dense_ext.deluge.modules import (
    EfficientCLDC,
    EfficientCompositeLayer,
    EfficientDelugeHead,
    EfficientDelugeStage,
    EfficientDelugeTransition,
    EfficientPreActBottleneck,
)
from dense_ext.deluge.spec import StageSpec

__all__ = [
    "CLDCFunction",
    "DelugeStageFunction",
    "EfficientCLDC",
    "EfficientCompositeLayer",
    "EfficientDelugeHead",
    "EfficientDelugeStage",
    "EfficientDelugeTransition",
    "EfficientPreActBottleneck",
    "StageSpec",
    "available_backends",
]
