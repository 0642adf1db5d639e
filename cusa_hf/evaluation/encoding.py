"""Encoding images and captions with a model (batched, deduplicated, sharded under ``accelerate``), and the
model-level evaluations built on it: retrieval (optionally ITM-reranked), STS and uni-modal image retrieval."""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import RerankConfig, adapter_class_of
from .eval_view import RetrievalEvalView
from ..images import load_image
from .loaders import LabelledImages, StsData
from .metrics import retrieval_metrics
from .reranking import rerank_with_itm
from .unimodal import image_retrieval_r1, sts_spearman


def _unique(values: Sequence[Any]) -> tuple[list[Any], torch.Tensor]:
    """Unique values (strings and paths by value; other objects are kept as they are) and the inverse index."""
    unique: list[Any] = []
    first_index: dict[Any, int] = {}
    inverse = []
    for value in values:
        key = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
        if key is None:
            inverse.append(len(unique))
            unique.append(value)
        else:
            if key not in first_index:
                first_index[key] = len(unique)
                unique.append(value)
            inverse.append(first_index[key])
    return unique, torch.tensor(inverse, dtype=torch.long)


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_features(output: Any) -> torch.Tensor:
    """Normalised float32 features from a tensor or a transformers output object (``pooler_output``)."""
    if not isinstance(output, torch.Tensor):
        output = output.pooler_output
    return F.normalize(output.float(), dim=-1)


def _encode(
    model: torch.nn.Module,
    n_items: int,
    collate: Callable[[list[int]], dict[str, torch.Tensor]],
    encode_batch: Callable[..., Any],
    batch_size: int,
    accelerator: Any,
    device: torch.device | str | None,
    show_progress: bool,
    desc: str,
) -> torch.Tensor:
    """Encode items ``0..n_items-1`` in batches; with an ``Accelerator`` each process encodes its shard and
    ``gather_for_metrics`` reassembles all ``n_items`` rows in order, dropping the padding of the last batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    loader = torch.utils.data.DataLoader(list(range(n_items)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
        device = accelerator.device
        show_progress = show_progress and accelerator.is_local_main_process
    else:
        device = torch.device(device) if device is not None else _model_device(model)
    chunks = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, disable=not show_progress):
                batch = {name: tensor.to(device) for name, tensor in batch.items()}
                features = _as_features(encode_batch(**batch))
                if accelerator is not None:
                    features = accelerator.gather_for_metrics(features)
                chunks.append(features)
    finally:
        model.train(was_training)
    features = torch.cat(chunks)
    if len(features) != n_items:
        raise RuntimeError(f"encoded {len(features)} rows for {n_items} items; the gather lost or duplicated rows")
    return features


def _head_kwargs(head: str | None, get_features: Callable[..., Any]) -> dict[str, str]:
    if head is None:
        return {}
    if head not in ("cross", "uni"):
        raise ValueError(f"head={head!r} is not supported; use 'cross', 'uni' or None (a plain backbone)")
    if "head" not in inspect.signature(get_features).parameters:
        # A plain backbone's get_*_features takes **kwargs and would silently ignore head=.
        owner = type(getattr(get_features, "__self__", get_features)).__name__
        raise ValueError(
            f"head={head!r} selects a CusaModel's embeddings, but {owner}.{get_features.__name__} has no head "
            "parameter (a model without CUSA heads); use head=None for a plain backbone"
        )
    return {"head": head}


def encode_images(
    model: torch.nn.Module,
    images: Sequence[Any],
    image_processor: Any,
    batch_size: int = 64,
    head: str | None = "cross",
    image_root: str | None = None,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    num_workers: int = 0,
) -> torch.Tensor:
    """L2-normalised `(len(images), dim)` float32 features, on the compute device, in the order of ``images``.

    Args:
        model: a ``CusaModel`` (``get_image_features(pixel_values=..., head=...)``); with ``head=None`` any model whose
            ``get_image_features(pixel_values=...)`` returns features or an output with ``pooler_output`` (a plain
            ``CLIPModel`` baseline).
        images: paths (relative to ``image_root``), PIL images or ``datasets.Image`` values; equal paths are
            decoded and encoded once.
        image_processor: e.g. ``CLIPImageProcessor``.
        head: ``"cross"`` (retrieval) or ``"uni"`` (USA head, uni-modal tasks).
        accelerator: an ``accelerate.Accelerator``; every process gets the full features.
        device: where to compute without an accelerator (default: the model's device).
        num_workers: DataLoader workers decoding images.
    """
    unique, inverse = _unique(images)
    # pixel_values and every other image input of the backbone (SigLIP 2's NaFlex pixel_attention_mask, spatial_shapes)
    input_names = ("pixel_values", *adapter_class_of(model).image_input_names)

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        pil_images = [load_image(unique[i], image_root, where=f"image {i}") for i in indices]
        processed = image_processor(images=pil_images, return_tensors="pt")
        return {name: processed[name] for name in input_names}

    kwargs = _head_kwargs(head, model.get_image_features)

    def encode_batch(**image_inputs: torch.Tensor) -> Any:
        return model.get_image_features(**image_inputs, **kwargs)

    features = _encode(model, len(unique), collate, encode_batch, batch_size, accelerator, device, show_progress,
                       "encoding images")
    return features[inverse.to(features.device)]


def encode_texts(
    model: torch.nn.Module,
    captions: Sequence[str],
    tokenizer: Any,
    batch_size: int = 256,
    head: str | None = "cross",
    max_length: int | None = None,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """L2-normalised `(len(captions), dim)` float32 text features; duplicate captions are encoded once.

    Captions are tokenized as in training (the backbone adapter's ``tokenize_captions``), truncated to ``max_length``
    tokens (default: the backbone's caption length, ``tokenizer.model_max_length`` or 77 for CLIP, 64 for SigLIP).
    Other arguments as in :func:`encode_images`.
    """
    unique, inverse = _unique([str(c) for c in captions])
    tokenization = adapter_class_of(model)

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        tokens = tokenization.tokenize_captions(tokenizer, [unique[i] for i in indices], max_length)
        return {key: tokens[key] for key in ("input_ids", "attention_mask") if key in tokens}

    kwargs = _head_kwargs(head, model.get_text_features)

    def encode_batch(**text_inputs: torch.Tensor) -> Any:
        return model.get_text_features(**text_inputs, **kwargs)

    features = _encode(model, len(unique), collate, encode_batch, batch_size, accelerator, device, show_progress,
                       "encoding texts")
    return features[inverse.to(features.device)]


def _project_tower_features(
    model: torch.nn.Module, modality: str, tower_features: torch.Tensor, head: str | None, accelerator: Any, device: Any
) -> torch.Tensor:
    """Normalised embeddings from a frozen tower's cached output (``RetrievalEvalView.*_tower_features``): the
    projections and heads only, computed whole in every process (they are small)."""
    if head is None:
        raise ValueError("cached tower features need a CusaModel and a head ('cross' or 'uni')")
    device = accelerator.device if accelerator is not None else (device or _model_device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            features = getattr(model, f"get_{modality}_features")(
                **{f"{modality}_tower_features": tower_features.to(device)}, head=head
            )
    finally:
        model.train(was_training)
    return _as_features(features)


def _unwrap(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    return accelerator.unwrap_model(model) if accelerator is not None else model


def split_similarity(
    model: torch.nn.Module,
    processor: Any,
    eval_view: RetrievalEvalView,
    batch_size: int = 64,
    text_batch_size: int = 256,
    accelerator: Any = None,
    head: str | None = "cross",
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """`(n_images, n_texts)` similarities of an evaluation split: every image and caption encoded once (cached
    frozen-tower columns projected instead), then the dot products of their features."""
    model = _unwrap(model, accelerator)
    if eval_view.image_tower_features is not None:
        image_features = _project_tower_features(model, "image", eval_view.image_tower_features, head, accelerator, device)
    else:
        image_features = encode_images(model, eval_view.images, processor.image_processor, batch_size, head,
                                       eval_view.image_root, accelerator, device, show_progress)
    if eval_view.text_tower_features is not None:
        text_features = _project_tower_features(model, "text", eval_view.text_tower_features, head, accelerator, device)
    else:
        text_features = encode_texts(model, eval_view.captions, processor.tokenizer, text_batch_size, head,
                                     accelerator=accelerator, device=device, show_progress=show_progress)
    return image_features @ text_features.T


def evaluate_retrieval(
    model: torch.nn.Module,
    processor: Any,
    eval_view: RetrievalEvalView,
    rerank: RerankConfig | None = None,
    show_progress: bool = True,
    **encoding: Any,
) -> dict[str, float]:
    """Encode an evaluation split once and compute the COCO/Flickr retrieval metrics.

    Args:
        processor: a transformers processor with ``.image_processor`` and ``.tokenizer`` (``CLIPProcessor``,
            ``VisionTextDualEncoderProcessor``).
        eval_view: the split's unique images, captions and caption -> image map (``RetrievalEvalView``).
        rerank: optional :class:`RerankConfig`; its ``itm_score`` takes indices into ``eval_view.images`` /
            ``eval_view.captions``.
        encoding: how the split is encoded, as :func:`split_similarity` takes it (``batch_size``,
            ``text_batch_size``, ``accelerator``, ``head``, ``device``).

    Returns:
        ``{"i2t_r1", ..., "t2i_r10", "rsum"}`` (percent); with ``rerank`` these are the reranked numbers and the
        dual-encoder ones are added with an ``itc_`` prefix. ``CusaTrainer`` reports them as ``eval_*``.
    """
    similarity = split_similarity(model, processor, eval_view, show_progress=show_progress, **encoding)
    metrics = retrieval_metrics(similarity, eval_view.text_to_image)
    if rerank is None:
        return metrics
    i2t_scores, t2i_scores = rerank_with_itm(similarity, rerank.itm_score, rerank.k_i2t, rerank.k_t2i,
                                             rerank.batch_size, show_progress)
    reranked = retrieval_metrics(i2t_scores, eval_view.text_to_image, t2i_similarity=t2i_scores)
    return {**reranked, **{f"itc_{name}": value for name, value in metrics.items()}}


def evaluate_sts(
    model: torch.nn.Module,
    tokenizer: Any,
    data: StsData,
    head: str | None = "uni",
    batch_size: int = 256,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> float:
    """STS Spearman x100 of a model's text features (``head="uni"``: the USA text head, as the paper's STS rows)."""
    model = _unwrap(model, accelerator)
    features = encode_texts(model, data.sentences1 + data.sentences2, tokenizer, batch_size, head,
                            accelerator=accelerator, device=device, show_progress=show_progress)
    return sts_spearman(features[: len(data)], features[len(data) :], data.scores)


def evaluate_image_retrieval(
    model: torch.nn.Module,
    image_processor: Any,
    data: LabelledImages,
    gallery: LabelledImages | None = None,
    head: str | None = "uni",
    batch_size: int = 64,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> float:
    """Uni-modal image retrieval R@1 of a model's image features (leave-one-out, or query -> ``gallery``)."""
    model = _unwrap(model, accelerator)

    def features_of(images: LabelledImages) -> torch.Tensor:
        return encode_images(model, images.images, image_processor, batch_size, head, images.image_root, accelerator,
                             device, show_progress)

    if gallery is None:
        return image_retrieval_r1(features_of(data), data.labels)
    return image_retrieval_r1(features_of(data), data.labels, features_of(gallery), gallery.labels)
