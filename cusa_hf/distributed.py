"""All-gathering features across processes, kept in one place.

``gather_with_grad`` uses ``torch.distributed.nn.functional.all_gather``, whose backward sums every process's gradient
into the owner's slice. Each process then computes the loss over the full global matrix, and DDP's gradient averaging
turns the world-size-fold sum back into exactly the gradient of a single process on the global batch (the trap of
custom gathers that return only the local gradient slice is tested in tests/test_distributed.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order, keeping autograd.

    Processes may hold different numbers of rows (the last batch of an epoch): rows are padded to the largest count
    for the collective and the padding is dropped afterwards.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    world_size = dist.get_world_size()
    local_rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    row_counts = [torch.zeros_like(local_rows) for _ in range(world_size)]
    dist.all_gather(row_counts, local_rows)
    row_counts = [int(count.item()) for count in row_counts]
    max_rows = max(row_counts)
    if tensor.shape[0] < max_rows:
        padding = [0, 0] * (tensor.dim() - 1) + [0, max_rows - tensor.shape[0]]
        tensor = F.pad(tensor, padding)
    pieces = all_gather(tensor)
    return torch.cat([piece[:rows] for piece, rows in zip(pieces, row_counts)], dim=0)
