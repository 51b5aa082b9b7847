"""One 1,536 x 8,960 projection (the target's MLP shape) at 1 to 64 rows: bf16 as aten runs it, bf16
oneDNN-packed (where oneDNN packs bf16), fp32, and int8 weights; ms per call, fastest of `REPS`.

Writes the JSON named on the command line (with the machine record and the ISA caps in force). Run
it as the host is and under `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` to see bf16 emulated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from engine.loading.cpu_linear import PackedLinear, native_bf16
from engine.loading.kernels import time_call
from engine.loading.quantize import QuantizedLinear
from specdecpp.bench.machine import machine_record

ROWS, REPS = (1, 4, 8, 16, 64), 7


def ms(fn, x: torch.Tensor) -> float:
    """Fastest of REPS calls, as the kernel chooser times a layer."""
    return round(time_call(fn, x, REPS), 3)


@torch.inference_mode()
def main(output: Path) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    bf16 = nn.Linear(1536, 8960, bias=False).requires_grad_(False).to(torch.bfloat16)
    fp32 = nn.Linear(1536, 8960, bias=False).requires_grad_(False)
    layers = {"bf16_aten": bf16, "fp32": fp32, "int8": QuantizedLinear(bf16, 8, wide_rows=1 << 30)}
    if native_bf16():
        layers["bf16_packed"] = PackedLinear(bf16)
    table = {name: {rows: ms(layer, torch.randn(rows, 1536, dtype=torch.float32 if name == "fp32" else torch.bfloat16))
                    for rows in ROWS} for name, layer in layers.items()}
    result = {"ms_per_call": table, "native_bf16": native_bf16(), "machine": machine_record()}
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(table))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
