"""Compiles an efficient DenseNet-BC and an efficient DelugeNet with the triton backend under
torch.compile(fullgraph=True), forward and backward, on CPU tensors with the kernels compiled
for sm_90 and their launches mocked (dense_ext.backends.triton.mock_gpu), and checks what the
traced graphs hand every Triton kernel: dense tensors only.

A ``triton_op`` launcher runs once under compile and bakes the strides it saw into the launch;
a channel slice of a buffer (what the CLDC launchers took until the H200 showed the compiled
DelugeNet's input gradient off by a relative 20.5) is where the tensor inductor passes can
differ from the traced one. The dense-block ops take whole buffers and column offsets. Prints
one line per model and "ok" at the end.

Run with TRITON_INTERPRET=0 and no visible GPU; used by tests/test_triton.py.
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd

import dense_ext.backends.triton as triton_package
from dense_ext.backends.triton import backend as block_backend
from dense_ext.backends.triton.mock_gpu import mocked_gpu
from dense_ext.grad_layout import is_dense
from python_models import densenet_bc
from python_models.delugenet import delugenet_cifar

WRAPPERS = (
    torch.ops.higher_order.triton_kernel_wrapper_functional,
    torch.ops.higher_order.triton_kernel_wrapper_mutation,
)


def handed_tensors(model: torch.nn.Module) -> list[tuple]:
    """(kernel index, argument, shape, stride) of every tensor the compiled forward and
    backward graphs of ``model`` pass to a Triton kernel."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiler = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    with mocked_gpu():
        torch.compile(model, fullgraph=True, backend=compiler)(x).sum().backward()
    return [
        (node.kwargs["kernel_idx"], name, tuple(val.shape), val.stride())
        for gm in graphs
        for node in gm.graph.nodes
        if node.target in WRAPPERS
        for name, arg in node.kwargs["kwargs"].items()
        if isinstance(val := getattr(arg, "meta", {}).get("val"), torch.Tensor)
    ]


def main() -> None:
    # CPU tensors stand in for CUDA ones.
    triton_package.unavailable_reason = lambda device: None
    block_backend.TritonBackend._check = staticmethod(lambda x: None)
    torch.manual_seed(0)
    models = {
        "DenseNet-BC-22": densenet_bc(
            depth=22, growth_rate=4, drop_rate=0.2, efficient=True, backend="triton", memory="min"
        ),
        "DelugeNet": delugenet_cifar(1, 0.25, efficient=True, backend="triton", memory="min"),
    }
    for name, model in models.items():
        handed = handed_tensors(model)
        assert len(handed) >= 20, (name, handed)
        strided = [h for h in handed if not is_dense(torch.empty_strided(*h[2:], device="meta"))]
        assert not strided, f"{name}: Triton kernels handed non-dense tensors: {strided}"
        print(f"{name}: {len(handed)} tensors handed to Triton kernels, all dense")
    print("ok")


if __name__ == "__main__":
    main()
