"""oneDNN pre-packed linear layers for CPU inference.

Decoding is a chain of matrix-vector products over every weight. On x86 CPUs, aten's bf16
`linear` reaches about half the memory bandwidth for a handful of rows, while oneDNN with
the weight reordered once into its blocked layout runs the same products about twice as
fast, with bit-identical results (measured on the default pair: every projection and the
151,936-row LM head). That is what inductor's CPU "freezing" does; here it is done
explicitly, module by module, so the model stays an ordinary Hugging Face model.

Only whole-CPU models in bf16 or fp32 are packed; CUDA models and models split by
accelerate hooks are left alone.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


class PackedLinear(nn.Module):
    """`nn.Linear` whose weight lives in oneDNN's pre-packed layout (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # The batch-size hint only picks oneDNN's blocking; any number of rows works.
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def can_pack(model: nn.Module) -> bool:
    """True for a model wholly on the CPU, in a packable dtype, with oneDNN available."""
    if not torch.backends.mkldnn.is_available():
        return False
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" for p in params):
        return False
    dtype = params[0].dtype
    if dtype not in PACKABLE_DTYPES:
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return not any(hasattr(m, "_hf_hook") for m in model.modules())


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of a CPU model by a `PackedLinear`, in place; returns how many.

    A tied LM head keeps its embedding (the embedding still reads the original weight).
    Idempotent: packed layers are skipped.
    """
    if not can_pack(model):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in PACKABLE_DTYPES:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    if replaced:
        log.info("packed %d linear layers for oneDNN", replaced)
    return replaced
