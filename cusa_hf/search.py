"""Search image and caption collections with a trained CUSA model.

:class:`RetrievalIndex` embeds a collection once with :func:`cusa_hf.evaluation.encoding.encode_images` /
:func:`~cusa_hf.evaluation.encoding.encode_texts`, keeps the embeddings in a ``datasets.Dataset`` (one per modality,
with the image ids, paths or captions alongside) and searches them through the dataset's FAISS inner-product index
(``Dataset.add_faiss_index``). Embeddings are L2-normalised, so a score is a cosine similarity, and an exact (``Flat``)
index ranks items exactly as the evaluation code's similarity matrix does.

One index holds the embeddings of one head:

* ``head="cross"`` (retrieval): text queries search the images, image queries search the captions;
* ``head="uni"`` (the USA heads): image queries search the images, text queries search the captions.

``target=`` overrides the default direction. A saved index records the model (name or path, revision, and a digest
of its weights), its processor (pixel settings, a digest of the tokenizer) and the head in ``manifest.json``; querying
it with another model, processor or head is refused. Loading reads
only the index folder's own files (a manifest that names files elsewhere is refused), and a file that does not read
whole (cut off while it was saved or copied) is named with the advice to rebuild the index.

Example::

    >>> from cusa_hf.search import RetrievalIndex
    >>> index = RetrievalIndex.build(model, processor, images="photos/", texts=["a dog on a beach", "two cats"])
    >>> index.search(texts="a dog catching a frisbee", k=2)[0]
    [{'index': 3, 'score': 0.41, 'image_id': 'dog.jpg', 'path': '/data/photos/dog.jpg'}, {'index': 0, ...}]
    >>> index.save("photos-index")
    >>> RetrievalIndex.load("photos-index").search(images=["query.jpg"], target="images", k=5)
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .index_identity import (
    check_recorded_folder,
    describe_model,
    describe_processor,
    model_label,
    processor_differences,
)
from .schema import first_row_per_image, is_caption, normalize_image_ids
from .evaluation.encoding import encode_images, encode_texts
from .version import __version__

MANIFEST_FILE = "manifest.json"
INDEX_FORMAT = "cusa-retrieval-index"
INDEX_FORMAT_VERSION = 1
EMBEDDING_COLUMN = "embedding"
HEADS = ("cross", "uni")
TARGETS = ("images", "texts")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("search needs FAISS: pip install 'cusa-hf[search]' (or pip install faiss-cpu)") from None
    return faiss


# ------------------------------------------------------------------------------------------------------ FAISS index
def add_embedding_index(
    dataset: datasets.Dataset, index_factory: str | None = None, search_parameters: str | None = None
) -> datasets.Dataset:
    """Attach a FAISS inner-product index over ``dataset["embedding"]`` (in place) and return ``dataset``.

    Args:
        dataset: a dataset with an ``embedding`` column of `(dim,)` float vectors.
        index_factory: ``None`` for an exact index (``IndexFlatIP``), else any FAISS ``index_factory`` string, e.g.
            ``"IVF1024,Flat"`` or ``"HNSW32"`` for large collections; indexes that need training are trained on the
            whole column.
        search_parameters: FAISS ``ParameterSpace`` settings applied after building, e.g. ``"nprobe=32"`` (IVF) or
            ``"efSearch=128"`` (HNSW).
    """
    faiss = _import_faiss()
    if len(dataset) == 0:
        raise ValueError("cannot index an empty collection: the dataset has no rows")
    dataset.add_faiss_index(
        column=EMBEDDING_COLUMN,
        index_name=EMBEDDING_COLUMN,
        string_factory=index_factory,
        metric_type=faiss.METRIC_INNER_PRODUCT,
        # Flat and HNSW ignore training; IVF and PQ indexes learn their clusters / codebooks from the collection.
        train_size=len(dataset) if index_factory is not None else None,
    )
    _set_search_parameters(dataset, search_parameters)
    return dataset


def _set_search_parameters(dataset: datasets.Dataset, search_parameters: str | None) -> None:
    if not search_parameters:
        return
    faiss = _import_faiss()
    index = dataset.get_index(EMBEDDING_COLUMN).faiss_index
    try:
        faiss.ParameterSpace().set_index_parameters(index, search_parameters)
    except RuntimeError as error:
        raise ValueError(
            f"search_parameters={search_parameters!r} do not apply to a {type(index).__name__}: {error}"
        ) from None


def _checked_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive whole number of results, got {k!r}")
    return int(k)


# ------------------------------------------------------------------------------------------------------ collections
def _image_values(
    images: Any, image_column: str, image_id_column: str
) -> tuple[list[Any], list[Any], list[str | None]]:
    """``(values, ids, paths)`` of the unique images of a dataset, a folder or a list."""
    if isinstance(images, datasets.Dataset):
        if image_column not in images.column_names:
            raise ValueError(
                f"images has no {image_column!r} column (image_column); its columns are {images.column_names}"
            )
        if isinstance(images.features[image_column], datasets.Image):
            images = images.cast_column(image_column, datasets.Image(decode=False))
        values = images[image_column]
        if image_id_column in images.column_names:
            ids = normalize_image_ids(images[image_id_column])
        else:
            ids = [_path_of(value) or str(row) for row, value in enumerate(values)]
        # A one-row-per-caption dataset repeats each image: keep the first row of each id, as evaluation does.
        first_row = first_row_per_image(ids)
        values = [values[row] for row in first_row.values()]
        return values, list(first_row), [_path_of(value) for value in values]
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"images={os.fspath(images)!r} is not a folder; pass a list to index single files")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"the folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return [str(p.resolve()) for p in files], [p.relative_to(folder).as_posix() for p in files], [
            str(p.resolve()) for p in files
        ]
    values = _without_repeated_paths(_as_image_list(images, "images"))
    paths = [_path_of(value) for value in values]
    return values, [path if path is not None else str(row) for row, path in enumerate(paths)], paths


def _without_repeated_paths(values: list[Any]) -> list[Any]:
    """``values`` without the later ones that name a file named before (one image, one row), with a warning; images
    without a path (PIL images, bytes) are kept."""
    first: dict[str, int] = {}
    kept, repeated = [], []
    for position, value in enumerate(values):
        path = _path_of(value)
        key = os.path.abspath(path) if path is not None else None
        if key is not None and key in first:
            repeated.append(f"images[{position}] {path!r} is images[{first[key]}] again")
            continue
        if key is not None:
            first[key] = position
        kept.append(value)
    if repeated:
        shown = "; ".join(repeated[:5]) + ("; ..." if len(repeated) > 5 else "")
        warnings.warn(f"{shown}: it is indexed once (one row per image, as for a dataset's repeated image ids)", stacklevel=3)
    return kept


def _path_of(value: Any) -> str | None:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, dict):
        return value.get("path")
    return None


def _as_image_list(images: Any, name: str) -> list[Any]:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    values = [os.fspath(value) if isinstance(value, os.PathLike) else value for value in images]
    for position, value in enumerate(values):
        if not isinstance(value, (str, dict, Image.Image)):
            raise ValueError(
                f"{name}[{position}] is a {type(value).__name__}; images are file paths, PIL images or "
                "datasets.Image values"
            )
    if not values:
        raise ValueError(f"{name} is empty")
    return values


def _caption_values(texts: Any, caption_column: str, image_id_column: str) -> tuple[list[str], list[Any] | None]:
    """``(captions, image id of each caption or None)`` of a dataset (caption lists flattened) or a list."""
    if isinstance(texts, datasets.Dataset):
        if caption_column not in texts.column_names:
            raise ValueError(
                f"texts has no {caption_column!r} column (caption_column); its columns are {texts.column_names}"
            )
        row_ids = normalize_image_ids(texts[image_id_column]) if image_id_column in texts.column_names else None
        captions, caption_ids = [], []
        for row, value in enumerate(texts[caption_column]):
            for caption in value if isinstance(value, (list, tuple)) else [value]:
                captions.append(caption)
                caption_ids.append(row_ids[row] if row_ids is not None else None)
        _check_captions(captions, f"texts[{caption_column!r}]")
        return captions, caption_ids if row_ids is not None else None
    captions = _as_caption_list(texts, "texts")
    return captions, None


def _as_caption_list(texts: Any, name: str) -> list[str]:
    captions = [texts] if isinstance(texts, str) else list(texts)
    if not captions:
        raise ValueError(f"{name} is empty")
    _check_captions(captions, name)
    return captions


def _check_captions(captions: Sequence[Any], name: str) -> None:
    for position, caption in enumerate(captions):
        if not is_caption(caption):
            raise ValueError(f"{name}[{position}] is {caption!r}; captions must be non-empty strings")


def _embedding_dataset(columns: dict[str, list[Any]], embeddings: torch.Tensor) -> datasets.Dataset:
    return datasets.Dataset.from_dict({**columns, EMBEDDING_COLUMN: embeddings.float().cpu().numpy()})


# --------------------------------------------------------------------------------------------------------- saved files
def _damaged(path: Path, reason: Any) -> ValueError:
    return ValueError(
        f"{path}: the saved index is damaged ({reason}); it may have been cut off while it was written or copied. "
        "Rebuild it (RetrievalIndex.build, then save(folder, overwrite=True))"
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a saved index, checked to be one (format, version, head, model and collections)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, f"not JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} is not "
            f"{INDEX_FORMAT!r} version {INDEX_FORMAT_VERSION}"
        )
    collections = manifest.get("collections")
    entries_ok = isinstance(collections, dict) and collections and all(
        name in TARGETS and isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("dataset", "faiss_index"))
        for name, entry in collections.items()
    )
    if manifest.get("head") not in HEADS or not isinstance(manifest.get("model"), dict) or not entries_ok:
        raise _damaged(path, "its head, model or collections entries are missing or malformed")
    return manifest


def _unreadable_arrow_file(folder: Path) -> Path | None:
    """The first Arrow file of a ``save_to_disk`` folder that does not read whole, to name in an error."""
    for path in sorted(folder.glob("*.arrow")):
        try:
            with pa.memory_map(os.fspath(path)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException):
            return path
    return None


def _file_in_index(folder: Path, manifest_path: Path, collection: str, name: str) -> Path:
    """``folder / name``, refused unless it lies inside the index folder: a manifest must not make a load read files
    elsewhere on the machine."""
    path = folder / name
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(
            f"{manifest_path}: collection {collection!r} names {name!r}, outside the index folder {folder}; an index "
            "reads only its own files. Rebuild it, or restore the manifest it was saved with"
        )
    return path


# ------------------------------------------------------------------------------------------------------------ index
class RetrievalIndex:
    """Embeddings of an image collection and/or a caption collection, each searchable through a FAISS index.

    Attributes:
        images: ``datasets.Dataset`` with columns ``image_id``, ``path`` (``None`` for in-memory images) and
            ``embedding`` `(dim,)`, one row per unique image, FAISS-indexed under ``"embedding"``; ``None`` when the
            index was built without images.
        texts: ``datasets.Dataset`` with columns ``caption``, ``image_id`` (the caption's image, when the caption
            collection was a dataset with an image id column) and ``embedding``; ``None`` without captions.
        head: ``"cross"`` or ``"uni"``, the model head that made every embedding.
        model_info: :func:`describe_model` of the model that made them.
        model, processor: what encodes queries; loaded from ``model_info["name_or_path"]`` on the first query when
            :meth:`load` was given none.

    Use :meth:`build` or :meth:`load` rather than the constructor.
    """

    def __init__(
        self,
        images: datasets.Dataset | None,
        texts: datasets.Dataset | None,
        head: str,
        model_info: dict[str, Any],
        index_factory: str | None = None,
        search_parameters: str | None = None,
        model: torch.nn.Module | None = None,
        processor: Any = None,
        device: torch.device | str | None = None,
        processor_info: dict[str, Any] | None = None,
    ):
        if images is None and texts is None:
            raise ValueError("a RetrievalIndex needs images, texts or both")
        self.images = images
        self.texts = texts
        self.head = head
        self.model_info = model_info
        self.index_factory = index_factory
        self.search_parameters = search_parameters
        self.model = model
        self.processor = processor
        self.device = device
        #: :func:`describe_processor` of the processor that prepared the index's inputs (``None``: not recorded).
        self.processor_info = processor_info
        self._processor_checked = False

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{name}={len(collection)}" for name, collection in (("images", self.images), ("texts", self.texts))
            if collection is not None
        )
        return f"RetrievalIndex({sizes}, head={self.head!r}, model={model_label(self.model_info)})"

    # ------------------------------------------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        processor: Any,
        images: Any = None,
        texts: Any = None,
        head: str = "cross",
        batch_size: int = 64,
        text_batch_size: int = 256,
        device: torch.device | str | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        image_id_column: str = "image_id",
        index_factory: str | None = None,
        search_parameters: str | None = None,
        show_progress: bool = True,
    ) -> "RetrievalIndex":
        """Embed ``images`` and/or ``texts`` with ``model`` and index them.

        Args:
            model: a ``CusaModel`` (its ``head`` embeddings are indexed).
            processor: a processor with ``.image_processor`` and ``.tokenizer`` (``CLIPProcessor``,
                ``VisionTextDualEncoderProcessor``).
            images: a ``datasets.Dataset`` with an ``image_column`` (paths or ``datasets.Image``; rows repeating an
                ``image_id_column`` value are one image, so a one-row-per-caption retrieval dataset works as is), a
                folder (every image file under it, ids = paths relative to it), or a list of paths / PIL images (a
                file named twice is indexed once, with a warning).
            texts: a ``datasets.Dataset`` with a ``caption_column`` (strings or caption lists; its
                ``image_id_column``, if any, is kept per caption) or a list of captions.
            head: ``"cross"`` (retrieval embeddings) or ``"uni"`` (USA heads, uni-modal search).
            batch_size, text_batch_size: encoding batch sizes for images / captions.
            device: where batches are encoded (default: the model's device).
            index_factory, search_parameters: see :func:`add_embedding_index`; default exact search.

        Example::

            >>> test = load_retrieval_dataset("coco_mini/test.json")
            >>> index = RetrievalIndex.build(model, processor, images=test, texts=test)  # 201 images, 1000 captions
        """
        if head not in HEADS:
            raise ValueError(f"head={head!r} is not supported; use one of {HEADS}")
        if images is None and texts is None:
            raise ValueError("pass images=, texts= or both: there is nothing to index")
        image_dataset = text_dataset = None
        if images is not None:
            values, ids, paths = _image_values(images, image_column, image_id_column)
            embeddings = encode_images(model, values, processor.image_processor, batch_size, head, device=device,
                                       show_progress=show_progress)  # fmt: skip
            image_dataset = add_embedding_index(
                _embedding_dataset({"image_id": ids, "path": paths}, embeddings), index_factory, search_parameters
            )
        if texts is not None:
            captions, caption_image_ids = _caption_values(texts, caption_column, image_id_column)
            embeddings = encode_texts(model, captions, processor.tokenizer, text_batch_size, head, device=device,
                                      show_progress=show_progress)  # fmt: skip
            columns = {"caption": captions}
            if caption_image_ids is not None:
                columns["image_id"] = caption_image_ids
            text_dataset = add_embedding_index(_embedding_dataset(columns, embeddings), index_factory, search_parameters)
        return cls(image_dataset, text_dataset, head, describe_model(model), index_factory, search_parameters,
                   model=model, processor=processor, device=device,
                   processor_info=describe_processor(processor))  # fmt: skip

    # ----------------------------------------------------------------------------------------------------- search
    def default_target(self, query_modality: str) -> str:
        """``"images"`` or ``"texts"``: the other modality with the cross head, the same one with the uni head."""
        same = query_modality
        other = "texts" if query_modality == "images" else "images"
        return other if self.head == "cross" else same

    def search(
        self,
        texts: str | Sequence[str] | None = None,
        images: Any = None,
        target: str | None = None,
        k: int = 10,
        batch_size: int = 64,
    ) -> list[list[dict[str, Any]]]:
        """The ``k`` best items of the ``target`` collection for each query.

        Args:
            texts: one caption or a list of captions to search with; or
            images: one image or a list (paths, PIL images or ``datasets.Image`` values).
            target: ``"images"`` or ``"texts"``; default :meth:`default_target` (cross head: text -> image and
                image -> text; uni head: image -> image and text -> text).
            k: results per query, a positive whole number (fewer when the collection is smaller).
            batch_size: query encoding batch size.

        Returns:
            One list per query, best first, of ``{"index", "score", ...}``: ``index`` is the row in ``self.images`` /
            ``self.texts``, ``score`` the cosine similarity, then the row's ``image_id`` and ``path`` (images) or
            ``caption`` and, when known, ``image_id`` (texts).
        """
        if (texts is None) == (images is None):
            raise ValueError("pass exactly one of texts= or images= as the queries")
        k = _checked_k(k)  # bad queries and k are named before a model is loaded
        captions = _as_caption_list(texts, "texts") if texts is not None else None
        model, processor = self._query_model()
        if captions is not None:
            query_modality = "texts"
            queries = encode_texts(model, captions, processor.tokenizer, batch_size, self.head,
                                   device=self.device, show_progress=False)  # fmt: skip
        else:
            query_modality = "images"
            queries = encode_images(model, _as_image_list(images, "images"), processor.image_processor, batch_size,
                                    self.head, device=self.device, show_progress=False)  # fmt: skip
        return self.search_embeddings(queries, target or self.default_target(query_modality), k)

    def search_embeddings(self, query_embeddings: Any, target: str, k: int = 10) -> list[list[dict[str, Any]]]:
        """:meth:`search` with query embeddings computed elsewhere: `(n_queries, dim)` rows, L2-normalised, from the
        same model and head as the index (not checked here)."""
        collection = self._collection(target)
        k = _checked_k(k)
        queries = np.ascontiguousarray(torch.as_tensor(query_embeddings).detach().float().cpu().numpy())
        dim = collection.get_index(EMBEDDING_COLUMN).faiss_index.d
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(
                f"query_embeddings must have shape (n_queries, {dim}) for the {target} collection, got {queries.shape}"
            )
        scores, indices = collection.search_batch(EMBEDDING_COLUMN, queries, min(k, len(collection)))
        # Approximate indexes can return fewer than k hits, padded with -1.
        found = [[int(i) for i in row if i >= 0] for row in indices]
        columns = [name for name in collection.column_names if name != EMBEDDING_COLUMN]
        with collection.formatted_as(columns=columns):
            rows = collection[[i for row in found for i in row]]
        results, position = [], 0
        for query_scores, query_found in zip(scores, found):
            hits = []
            for rank, item in enumerate(query_found):
                hits.append({"index": item, "score": float(query_scores[rank]),
                             **{name: rows[name][position] for name in columns}})  # fmt: skip
                position += 1
            results.append(hits)
        return results

    def _collection(self, target: str) -> datasets.Dataset:
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not supported; use one of {TARGETS}")
        collection = self.images if target == "images" else self.texts
        if collection is None:
            argument = "images=" if target == "images" else "texts="
            raise ValueError(f"this index has no {target} collection (it was built without {argument}); "
                             f"search another target or rebuild with {argument}")  # fmt: skip
        return collection

    def _query_model(self) -> tuple[torch.nn.Module, Any]:
        """The query encoder: the one given, else the recorded checkpoint, loaded once and checked."""
        if self.model is None:
            name = self.model_info.get("name_or_path")
            if name is None:
                raise ValueError(
                    f"this index records no checkpoint to encode queries with ({model_label(self.model_info)}); "
                    "pass model= and processor= to RetrievalIndex.load"
                )
            check_recorded_folder(name, self.model_info)
            from transformers import AutoModel

            model = AutoModel.from_pretrained(name, revision=self.model_info.get("revision"))
            self.model = self._checked_model(model.to(self.device) if self.device is not None else model)
        if self.processor is None:
            name = self.model_info.get("name_or_path")
            if name is None:
                raise ValueError("this index records no checkpoint to load a processor from; pass processor= to load")
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(name, revision=self.model_info.get("revision"))
        if not self._processor_checked and self.processor_info is not None:
            differences = processor_differences(self.processor_info, describe_processor(self.processor))
            if differences:
                raise ValueError(
                    f"this index was built with another processor than the one that would encode the queries "
                    f"({'; '.join(differences)}): their embeddings are not comparable. Query with the processor the "
                    "index was built with, or rebuild the index with this one"
                )
        self._processor_checked = True
        return self.model, self.processor

    def _checked_model(self, model: torch.nn.Module) -> torch.nn.Module:
        actual = describe_model(model)
        if actual["weights_sha256"] != self.model_info["weights_sha256"]:
            raise ValueError(
                f"this index was built with {model_label(self.model_info)}, head {self.head!r}, but the query model "
                f"is {model_label(actual)}: their embeddings are not comparable. Query with the model the index was "
                "built with, or rebuild the index with this one"
            )
        return model

    # ------------------------------------------------------------------------------------------------ save / load
    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the index to ``folder``: per collection a ``save_to_disk`` dataset (``images/``, ``texts/``) and
        its FAISS index (``images.faiss``, ``texts.faiss``), and ``manifest.json`` (model, head, index settings)."""
        folder = Path(folder)
        if (folder / MANIFEST_FILE).exists() and not overwrite:
            raise FileExistsError(f"{folder} already holds an index ({MANIFEST_FILE}); pass overwrite=True to replace it")
        if not (folder / MANIFEST_FILE).exists():
            written = (*TARGETS, *(f"{target}.faiss" for target in TARGETS))
            in_the_way = [name for name in written if (folder / name).exists()]
            if in_the_way:
                raise FileExistsError(
                    f"{folder} holds {', '.join(in_the_way)}, which no index wrote (it has no {MANIFEST_FILE}): saving "
                    "the index there would replace them. Save it into an empty or new folder"
                )
        folder.mkdir(parents=True, exist_ok=True)
        collections = {}
        for name, collection in (("images", self.images), ("texts", self.texts)):
            if collection is None:
                continue
            index_file = folder / f"{name}.faiss"
            collection.save_faiss_index(EMBEDDING_COLUMN, index_file)
            # save_to_disk refuses a dataset with an attached index; the index is re-read from the file just written.
            collection.drop_index(EMBEDDING_COLUMN)
            try:
                collection.save_to_disk(folder / name)
            finally:
                collection.load_faiss_index(EMBEDDING_COLUMN, index_file)
                _set_search_parameters(collection, self.search_parameters)
            collections[name] = {
                "count": len(collection),
                "dim": collection.get_index(EMBEDDING_COLUMN).faiss_index.d,
                "dataset": name,
                "faiss_index": index_file.name,
            }
        manifest = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "head": self.head,
            "model": self.model_info,
            "processor": self.processor_info,
            "index_factory": self.index_factory,
            "search_parameters": self.search_parameters,
            "collections": collections,
            "cusa_hf_version": __version__,
        }
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        model: torch.nn.Module | None = None,
        processor: Any = None,
        head: str | None = None,
        device: torch.device | str | None = None,
    ) -> "RetrievalIndex":
        """Read an index written by :meth:`save`.

        Args:
            model: the query encoder; it must be the model the index was built with (same weights), else a
                ``ValueError`` names both. Default: the checkpoint recorded in the manifest, loaded on the first query.
            processor: default: loaded from the recorded checkpoint when a query needs it.
            head: optional check; a head other than the index's is refused.
            device: where queries are encoded (and the recorded model is placed).
        """
        folder = Path(folder)
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{folder} is not a saved RetrievalIndex: it has no {MANIFEST_FILE}")
        manifest = _read_manifest(manifest_path)
        if head is not None and head != manifest["head"]:
            raise ValueError(
                f"{folder} was built with head {manifest['head']!r} of {model_label(manifest['model'])}; "
                f"head={head!r} embeddings are not comparable with it. Build an index with head={head!r}"
            )
        loaded = {}
        for name, entry in manifest["collections"].items():
            dataset_folder = _file_in_index(folder, manifest_path, name, entry["dataset"])
            index_file = _file_in_index(folder, manifest_path, name, entry["faiss_index"])
            try:
                collection = datasets.load_from_disk(os.fspath(dataset_folder))
            except (OSError, ValueError, pa.ArrowException) as error:
                raise _damaged(_unreadable_arrow_file(dataset_folder) or dataset_folder, error) from None
            try:
                collection.load_faiss_index(EMBEDDING_COLUMN, index_file)
            except (OSError, RuntimeError) as error:
                raise _damaged(index_file, error) from None
            faiss_index = collection.get_index(EMBEDDING_COLUMN).faiss_index
            if (faiss_index.ntotal, faiss_index.d) != (len(collection), entry.get("dim", faiss_index.d)) or len(
                collection
            ) != entry.get("count", len(collection)):
                raise _damaged(
                    index_file,
                    f"it holds {faiss_index.ntotal} vectors of width {faiss_index.d}, the manifest records "
                    f"{entry.get('count')} of width {entry.get('dim')} and {dataset_folder.name}/ has {len(collection)} rows",
                )
            _set_search_parameters(collection, manifest.get("search_parameters"))
            loaded[name] = collection
        index = cls(loaded.get("images"), loaded.get("texts"), manifest["head"], manifest["model"],
                    manifest.get("index_factory"), manifest.get("search_parameters"), processor=processor,
                    device=device, processor_info=manifest.get("processor"))  # fmt: skip
        if model is not None:
            index.model = index._checked_model(model)
        return index
