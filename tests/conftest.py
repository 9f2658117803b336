"""pytest's setup for tests/: what must happen before any test module is collected. Shared
helpers live in tests/helpers.py (imported as a module; this file is not)."""

from __future__ import annotations

import os

import torch

# Before any test module is collected: whichever imports dense_ext's Triton kernels first (the
# dense block's or the DelugeNet stage's) defines them, and they must be defined for the
# interpreter when there is no GPU. torch.cuda.is_available() creates no CUDA context.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
