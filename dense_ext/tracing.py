"""What is tracing the current call: ``torch.export`` as opposed to ``torch.compile``."""

import torch


def is_exporting() -> bool:
    """True only while ``torch.export`` traces the call (strict or not), as
    ``torch.compiler.is_exporting()`` promises.

    torch 2.11's Dynamo (the GPU image's version) folds ``torch.compiler.is_exporting()`` to
    True under any Dynamo trace, ``torch.compile`` included, which sent every compiled
    DelugeNet down its unfused export path. The flag it should have read is set by
    ``torch.export`` alone, and reading a module global is what later Dynamo versions do
    (guarded, so a graph traced for export is not reused outside it).
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    return torch.compiler.is_exporting()


class NotScriptable:
    """Mixin: ``torch.jit.script`` of the module (or of a model holding it) raises one clear
    error instead of TorchScript's report on the first construct it cannot compile.

    The fused paths are autograd Functions with hand-written backwards and custom ops, which
    TorchScript cannot compile, and ``torch.jit.script`` is deprecated by PyTorch; the graph
    captures that are supported (``torch.export``, ``torch.compile``, ``torch.jit.trace``)
    are tested. ``torch.jit.script`` calls ``__prepare_scriptable__`` on every module it
    compiles before anything else.
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (deprecated by "
            "PyTorch): dense_ext's fused paths are autograd Functions with hand-written "
            "backwards, which TorchScript cannot compile. Capture the model with "
            "torch.export.export, torch.compile or torch.jit.trace instead; for a TorchScript "
            "DenseNet, script a torchvision DenseNet that loaded this model's state_dict "
            "(the keys are torchvision's)."
        )
