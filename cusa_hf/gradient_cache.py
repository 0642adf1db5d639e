"""Gradient caching of the CUSA loss (``CusaTrainingArguments.loss_chunk_size``): a training step that computes a large
batch's embeddings chunk by chunk and back-propagates the whole batch's loss chunk by chunk.

:func:`cached_gradient_step` is the whole step, beside the loss it caches gradients for (as sentence-transformers'
cached losses): ``CusaTrainer.training_step`` checks the settings once (:func:`check_loss_chunking`) and calls it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import get_device_states, set_device_states
from transformers import TrainingArguments

from .distributed import is_distributed
from .losses import CusaLossOutput
from .modeling_cusa import CusaOutput
from .schema import TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN

#: Batch entries that only the loss reads, for the whole batch at once; every other tensor of a batch is a per-pair
#: model input, which a chunked step cuts into chunks.
LOSS_INPUTS = ("image_ids", TEACHER_IMAGE_COLUMN, TEACHER_TEXT_COLUMN)
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


def check_loss_chunking(model: Any, args: TrainingArguments | None, wrapped_model: nn.Module | None = None) -> None:
    """Refuse a ``loss_chunk_size`` that is not a positive number of pairs, or a model or setting whose chunked step
    would not equal the unchunked one, naming the reason. ``wrapped_model``: the model as the step receives it
    (wrapped for DDP, FSDP, ...), once training has wrapped it."""
    chunk_size = getattr(args, "loss_chunk_size", None)
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"loss_chunk_size={chunk_size!r} must be a positive number of pairs (or None to turn it off)")
    if wrapped_model is not None and is_distributed() and not isinstance(wrapped_model, DistributedDataParallel):
        raise ValueError(
            f"loss_chunk_size={chunk_size} supports one process or DDP; this run wraps the model in "
            f"{type(wrapped_model).__name__} (FSDP?). Train without loss_chunk_size or with DDP"
        )
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


def cached_gradient_step(
    model: nn.Module,
    inputs: dict[str, Any],
    chunk_size: int,
    accelerator: Any,
    gradient_accumulation_steps: int = 1,
    on_loss: Callable[[CusaLossOutput], None] | None = None,
) -> torch.Tensor:
    """Gradient caching (Gao et al., 2021) of the CUSA loss: accumulates one micro-batch's gradients into ``model``'s
    parameters, the same as ``loss / gradient_accumulation_steps`` back-propagated at once, and returns the batch's
    loss, detached.

    1. The embeddings of the batch, chunk by chunk without keeping activations (``no_grad``); each chunk's RNG
       state is kept.
    2. InfoNCE + CSA + USA of the whole batch (gathered across processes with ``gather_features``) on those
       embeddings, and the loss's gradients w.r.t. them and the temperatures.
    3. Each chunk again with gradients, its RNG state restored (same dropout masks), back-propagated with its rows
       of the embedding gradients; the temperatures' gradients go in with the first chunk. Under DDP the
       gradients are then averaged over processes.

    Peak activation memory is one chunk's, plus the `(batch_size, dim)` embeddings and the loss's B x B terms.

    Args:
        model: the ``CusaModel`` as training holds it (possibly wrapped by ``accelerator``, e.g. in DDP).
        inputs: a batch of ``CusaDataCollator``, on the model's device.
        chunk_size: pairs per chunk.
        accelerator: the ``accelerate.Accelerator`` that unwraps the model and runs ``backward``.
        gradient_accumulation_steps: micro-batches per optimiser step (the gradients are scaled by its inverse).
        on_loss: called with the batch's ``CusaLossOutput`` (its logged terms) before the chunks back-propagate.
    """
    unwrapped = accelerator.unwrap_model(model)
    loss_inputs = {key: value for key, value in inputs.items() if key in LOSS_INPUTS}
    pair_inputs = {key: value for key, value in inputs.items() if key not in LOSS_INPUTS}
    batch_size = next(value.shape[0] for value in pair_inputs.values() if isinstance(value, torch.Tensor))
    chunks = [slice(start, start + chunk_size) for start in range(0, batch_size, chunk_size)]

    random_states, pieces = [], []
    with torch.no_grad():
        for rows in chunks:
            chunk_inputs = chunk_rows(pair_inputs, rows)
            random_states.append(ChunkRandomState(chunk_inputs.values()))
            pieces.append(unwrapped(**chunk_inputs, return_loss=False))
    # Float32 leaves: the cached gradients keep full precision under fp16/bf16 autocast.
    embeddings = {
        name: torch.cat([getattr(piece, name) for piece in pieces]).float().requires_grad_()
        for name in EMBEDDING_FIELDS
        if getattr(pieces[0], name) is not None
    }
    del pieces
    losses = unwrapped.loss_from_embeddings(CusaOutput(**embeddings), **loss_inputs)
    if on_loss is not None:
        on_loss(losses)
    loss = losses.loss
    # The temperatures and the contrastive term's scalars (the backbone's own for SigLIP): used only in the loss.
    temperatures = list(unwrapped.loss_parameters().values())
    # allow_unused: a term switched off by a zero weight leaves its embeddings and temperature without gradient,
    # as in the unchunked step.
    gradients = torch.autograd.grad(loss, [*embeddings.values(), *temperatures], allow_unused=True)
    embedding_gradients = {name: gradient for name, gradient in zip(embeddings, gradients) if gradient is not None}
    temperature_gradients = [
        (temperature, gradient)
        for temperature, gradient in zip(temperatures, gradients[len(embeddings):])
        if gradient is not None
    ]
    del embeddings, losses  # the B x B terms are not needed any more

    scale = 1.0 / gradient_accumulation_steps
    for position, (rows, random_state) in enumerate(zip(chunks, random_states)):
        with random_state.restored():
            output = unwrapped(**chunk_rows(pair_inputs, rows), return_loss=False)
        # d(surrogate)/d(chunk embeddings) = the cached gradients: its backward is the chunk's share of the loss's.
        surrogate = sum(
            (getattr(output, name).float() * gradient[rows]).sum() for name, gradient in embedding_gradients.items()
        )
        if position == 0:
            surrogate += sum((temperature * gradient).sum() for temperature, gradient in temperature_gradients)
        accelerator.backward(surrogate * scale)
    # No chunk ran through the DDP wrapper (its reducer expects one forward per backward, and with
    # find_unused_parameters it would count the temperatures, used only in the loss, as unused): average the
    # gradients as its backward would, at the last micro-batch of an optimiser step (not inside no_sync).
    if isinstance(model, DistributedDataParallel) and model.require_backward_grad_sync:
        average_gradients_across_processes(unwrapped)
    return loss.detach()
