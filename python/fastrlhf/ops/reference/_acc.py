import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
