"""Linear layers with pre-packed weights, for fast multi-token forwards of float32 models on a CPU.

Used by every decoder that verifies several tokens at once (speculative decoding, `eval`, the
regeneration batches), on the target and the draft alike.
"""

from __future__ import annotations

import statistics
import time

import torch


class PackedLinear(torch.nn.Module):
    """nn.Linear for CPU float32 decoding: MKL's GEMV for one row, oneDNN with a pre-packed weight for more.

    MKL's float32 GEMM re-packs the weight on every call, so a forward over 2-24 tokens (verification)
    costs 1.5-2.5x a one-token forward; with the weight packed once, oneDNN makes it nearly the cost of
    one token, which is what speculative decoding relies on. The original weight is kept for the GEMV.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        # Fewer rows than this take MKL's path. Where the packed GEMM pays from depends on the CPU
        # and its threads (on one 2-core Xeon MKL is faster up to 3 rows, on one 2-core EPYC the
        # packed one is faster from 1 row): `set_min_packed_rows`, `choose_single_row_path`.
        self.min_packed_rows = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_packed_rows * x.shape[-1]:  # a single row, or few enough rows
            return self.mkl(x)
        return self.onednn(x)

    def mkl(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> bool:
    """Swap a float32 CPU model's nn.Linear layers for `PackedLinear` in place; False if not applicable."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or params[0].dtype != torch.float32:
        return False  # bfloat16 linears already run through oneDNN
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(module, name, PackedLinear(child))
    except (RuntimeError, AttributeError):  # an older torch without these oneDNN ops
        return False
    return True


def set_min_packed_rows(model: torch.nn.Module, rows: int) -> None:
    """Forwards of fewer than `rows` rows run every `PackedLinear` of `model` through MKL's path."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.min_packed_rows = rows


def min_packed_rows(model: torch.nn.Module) -> int:
    """The row count from which `model`'s `PackedLinear` layers take the packed path (2 if it has none)."""
    return next((m.min_packed_rows for m in model.modules() if isinstance(m, PackedLinear)), 2)


@torch.inference_mode()
def choose_single_row_path(model: torch.nn.Module, repeats: int = 15, warmup: int = 3) -> dict:
    """Time every `PackedLinear` of `model` on one row through MKL's path and through the packed one
    (all layers per round, the two paths interleaved; medians) and let one-row forwards take the faster.

    A plain decoding step is one row per layer, so this decides what plain decoding costs: measured
    per machine, so that speculative decoding is compared against the fastest plain decoding, not
    against a path that happens to be slow on this CPU. Returns both medians (seconds) and the choice.
    """
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not layers:
        return {}
    rows = [torch.randn(1, 1, m.in_features, dtype=m.weight.dtype) for m in layers]
    times: dict[str, list[float]] = {"mkl": [], "packed": []}
    for round_ in range(warmup + repeats):
        for path in ("mkl", "packed"):
            start = time.perf_counter()
            for layer, x in zip(layers, rows):
                layer.mkl(x) if path == "mkl" else layer.onednn(x)
            if round_ >= warmup:
                times[path].append(time.perf_counter() - start)
    medians = {path: statistics.median(values) for path, values in times.items()}
    single_row_packed = medians["packed"] < medians["mkl"]
    set_min_packed_rows(model, 1 if single_row_packed else 2)
    return {"single_row_seconds": medians, "single_row_packed": single_row_packed}

