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
