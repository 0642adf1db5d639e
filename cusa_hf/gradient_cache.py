"""Gradient caching of the CUSA loss (``CusaTrainingArguments.loss_chunk_size``): the pieces of a training step
that computes a large batch's embeddings chunk by chunk and back-propagates the whole batch's loss chunk by chunk
(``CusaTrainer.training_step``)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states
from transformers import TrainingArguments

#: Batch entries that only the loss reads, for the whole batch at once; every other tensor of a batch is a per-pair
#: model input, which a chunked step cuts into chunks.
LOSS_INPUTS = ("image_ids", "teacher_image_embeds", "teacher_text_embeds")
#: The outputs of ``CusaModel.forward(return_loss=False)`` that the loss reads (the USA ones are None without heads).
EMBEDDING_FIELDS = ("image_embeds", "text_embeds", "uni_image_embeds", "uni_text_embeds")

def average_gradients_across_processes(model: nn.Module) -> None:
    """Replace every gradient of ``model`` by its mean over the processes (what DDP's backward does, one tensor at a
    time: no copy of all gradients at once)."""
    world_size = torch.distributed.get_world_size()
    for parameter in model.parameters():
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad.div_(world_size)


def chunk_rows(inputs: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The ``rows`` of every tensor of a batch of pair inputs (other values as they are)."""
    return {key: value[rows] if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


class ChunkRandomState:
    """The CPU and accelerator RNG states before a chunk's no-grad pass, restored for its re-run with gradients so
    that dropout draws the same masks in both (what ``torch.utils.checkpoint`` does with ``preserve_rng_state``).

    Args:
        tensors: the chunk's input tensors; the RNGs of the accelerator devices they are on are saved too.
    """

    def __init__(self, tensors: Any):
        tensors = list(tensors)
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    @contextlib.contextmanager
    def restored(self):
        """Run the block from the saved states; the RNGs continue afterwards as if it had not run."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states)
            yield


def check_loss_chunking(model: Any, args: TrainingArguments | None) -> None:
    """Refuse a ``loss_chunk_size`` that is not a positive number of pairs, or a model or setting whose chunked step
    would not equal the unchunked one, naming the reason."""
    chunk_size = getattr(args, "loss_chunk_size", None)
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"loss_chunk_size={chunk_size!r} must be a positive number of pairs (or None to turn it off)")
    adapter = model.adapter
    model_type = model.config.backbone_config.model_type
    if adapter.has_original_loss or adapter.scores_pairs_itself:
        what = (
            "scores image-text pairs itself from their token features"
            if adapter.scores_pairs_itself
            else "brings its own loss (ITM on hard negatives mined from the batch's token features)"
        )
        raise ValueError(
            f"loss_chunk_size={chunk_size} cannot be used with a {model_type!r} backbone: it {what}, so its loss is "
            "not a function of per-pair embeddings that chunks could cache. Train it without loss_chunk_size"
        )
    optim = getattr(getattr(args, "optim", None), "value", None)
    if getattr(args, "deepspeed", None) or optim in ("lomo", "adalomo"):
        engine = "DeepSpeed" if getattr(args, "deepspeed", None) else f"optim={optim!r}"
        raise ValueError(
            f"loss_chunk_size={chunk_size} back-propagates chunk by chunk, but {engine} updates the weights inside "
            "every backward pass; train with one or the other"
        )
    if getattr(args, "n_gpu", 1) > 1:
        raise ValueError(
            f"loss_chunk_size={chunk_size} does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one process); "
            "launch one process per GPU (torchrun / accelerate launch)"
        )
    live_norms = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    if live_norms:
        raise ValueError(
            f"loss_chunk_size={chunk_size}: {len(live_norms)} BatchNorm layers are in training mode (first: "
            f"{live_norms[0]}); they would normalise each chunk with its own statistics and update their running "
            "statistics twice per step. Freeze that tower (freeze_vision_tower / cusa_hf.freeze_tower) or train "
            "without loss_chunk_size"
        )
