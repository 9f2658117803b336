"""dense_ext: DenseNet dense blocks in linear activation memory.

Public names:
    EfficientDenseBlock  drop-in for torchvision's ``_DenseBlock`` over one shared buffer.
    DenseBlockFunction   the whole block as one ``torch.autograd.Function``.
    BlockSpec            a block's static configuration.
    BlockCall            one block call's decisions (per-BN NormCalls, per-layer dropout).
    NormCall, norm_call  how one BN normalises in a call, read as nn.BatchNorm2d reads it.
    EfficientTransition  a DenseNet transition that recomputes BN-ReLU and pools first.
    convert              swaps a torchvision-structured DenseNet's blocks in place.
    ConvertedStage       what convert makes of a stage whose dense layers are its own children
                         (pytorchcv's): its transition and one EfficientDenseBlock, keeping
                         the library's state_dict keys.
    available_backends   backends that can run on a device.
"""

# Loads the C++/CUDA extension when it is built, so that torch.ops.dense_ext.* (and their fake
# kernels) exist after `import dense_ext`; without it this import still succeeds.
import dense_ext.backends.cpp  # noqa: F401
from dense_ext.backends import BackendUnavailableError, available_backends
from dense_ext.backends.base import BlockCall
from dense_ext.block import (
    DenseDtypeError,
    DenseInputError,
    EfficientDenseBlock,
    EfficientDenseLayer,
)
from dense_ext.convert import ConvertedStage, convert
from dense_ext.function import DenseBlockFunction
from dense_ext.norm import NormCall, norm_call
from dense_ext.spec import BlockSpec
from dense_ext.transition import EfficientTransition

__all__ = [
    "BackendUnavailableError",
    "BlockCall",
    "BlockSpec",
    "ConvertedStage",
    "DenseDtypeError",
    "DenseInputError",
    "DenseBlockFunction",
    "EfficientDenseBlock",
    "EfficientDenseLayer",
    "EfficientTransition",
    "NormCall",
    "available_backends",
    "convert",
    "norm_call",
]
