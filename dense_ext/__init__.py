"""dense_ext: DenseNet dense blocks in linear activation memory.

Public names:
    EfficientDenseBlock  drop-in for torchvision's ``_DenseBlock`` over one shared buffer.
    DenseBlockFunction   the whole block as one ``torch.autograd.Function``.
    BlockSpec            a block's static configuration.
    available_backends   backends that can run on a device.
"""

from dense_ext.backends import BackendUnavailableError, available_backends
from dense_ext.block import (
    DenseDtypeError,
    DenseInputError,
    EfficientDenseBlock,
    EfficientDenseLayer,
)
from dense_ext.function import BlockCall, DenseBlockFunction, RunningStats
from dense_ext.spec import BlockSpec

__all__ = [
    "BackendUnavailableError",
    "BlockCall",
    "BlockSpec",
    "DenseDtypeError",
    "DenseInputError",
    "DenseBlockFunction",
    "EfficientDenseBlock",
    "EfficientDenseLayer",
    "RunningStats",
    "available_backends",
]
