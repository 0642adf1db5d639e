"""Real images for the built-in default run: the CUSA authors' example data, fetched once into the user's cache.

The CUSA authors publish a small MS-COCO sample with their code (``lerogo/aaai24_itr_cusa``, folder
``dataset_example/``): 1,002 images with their five captions each, split into ``new_train.json`` (600 images),
``new_val.json`` (201) and ``new_test.json`` (201), about 160 MB. :func:`fetch_example_data` downloads it file by
file from a pinned commit, checks every file's size and SHA-256 against the list shipped with this package
(``example_data.sha256``), resumes interrupted downloads, and converts the records to the layout every loader in
``cusa_hf.data`` reads (``train.json``, ``validation.json``, ``test.json`` with ``{"image": "images/<file>",
"caption", "image_id"}``, images in ``images/``): the layout of the repository's own ``coco_mini``, which is a
resized copy of the same images.

COCO images come from Flickr under Creative Commons licences (https://cocodataset.org/#termsofuse); the COCO
captions are CC BY 4.0.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .offline_models import default_cache_dir
from .synthetic_data import write_shapes_dataset

logger = logging.getLogger(__name__)

SOURCE_REPOSITORY = "lerogo/aaai24_itr_cusa"
SOURCE_COMMIT = "58e872150a567832ab3c4a8e167c54ee21ff6a0e"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{SOURCE_REPOSITORY}/{SOURCE_COMMIT}/dataset_example/"
#: Environment variable naming another base URL (a mirror, or ``file://`` folder) holding the same files.
BASE_URL_ENV = "CUSA_EXAMPLE_DATA_URL"
MANIFEST_FILE = Path(__file__).with_name("example_data.sha256")
LICENCE = (
    "MS-COCO 2014 images (Flickr, Creative Commons licences: https://cocodataset.org/#termsofuse) and captions "
    "(CC BY 4.0), as published in the CUSA authors' example data"
)
#: Source record files and the split file each becomes.
SPLITS = {"new_train.json": "train.json", "new_val.json": "validation.json", "new_test.json": "test.json"}
_CHUNK = 1 << 20


class ExampleDataUnavailable(RuntimeError):
    """The example data could not be downloaded (offline, or the source refused); the message says why."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


def read_manifest(path: str | os.PathLike = MANIFEST_FILE) -> list[ManifestEntry]:
    """The files to fetch: ``sha256  size  path`` lines (``#`` starts a comment), paths relative to the base URL."""
    entries = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=2)
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[0]) != 64:
            raise ValueError(f"{path}, line {number}: expected 'sha256  size  path', got {line!r}")
        if ".." in Path(parts[2]).parts or Path(parts[2]).is_absolute():
            raise ValueError(f"{path}, line {number}: path {parts[2]!r} leaves the data folder")
        entries.append(ManifestEntry(parts[2], int(parts[1]), parts[0]))
    return entries


def default_example_data_dir() -> Path:
    return default_cache_dir() / "coco_example"


def _local_path(folder: Path, entry: ManifestEntry) -> Path:
    """Where a source file lands: images in ``images/``, the authors' record files in ``source/``."""
    name = Path(entry.path).name
    return folder / ("images" if name.lower().endswith((".jpg", ".jpeg", ".png")) else "source") / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _partial_size(target: Path) -> int:
    partial = target.with_name(target.name + ".part")
    return partial.stat().st_size if partial.exists() else 0


def _download(url: str, target: Path, entry: ManifestEntry, progress: tqdm, timeout: float) -> None:
    """Download ``url`` to ``target`` through ``target.part``, resuming a partial file with an HTTP range request;
    the finished file must match the entry's size and SHA-256."""
    partial = target.with_name(target.name + ".part")
    have = _partial_size(target)
    if have > entry.size:
        partial.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": "cusa-hf"})
    resuming = have > 0 and url.startswith(("http://", "https://"))
    if resuming:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if resuming and getattr(response, "status", None) != 206:
            resuming = False  # the server sent the whole file: start over
        if not resuming:
            progress.update(-have)
            have = 0
        with partial.open("ab" if resuming else "wb") as handle:
            for block in iter(lambda: response.read(_CHUNK), b""):
                handle.write(block)
                progress.update(len(block))
    size = partial.stat().st_size
    if size != entry.size or _sha256(partial) != entry.sha256:
        partial.unlink()
        raise ValueError(
            f"{url}: downloaded file does not match the expected checksum (size {size}, expected {entry.size}); "
            "it was deleted, run again to fetch it anew"
        )
    os.replace(partial, target)


def _convert_records(folder: Path) -> None:
    """Write the authors' record files as ``train.json`` / ``validation.json`` / ``test.json`` in the package's
    JSON layout, each record pointing at ``images/<file>``."""
    for source_name, split_name in SPLITS.items():
        records = json.loads((folder / "source" / source_name).read_text(encoding="utf-8"))
        converted = []
        for number, record in enumerate(records):
            try:
                image = Path(record["image_path"]).name
                caption, image_id = record["caption"], record["image_id"]
            except (KeyError, TypeError):
                raise ValueError(f"{source_name}, record {number}: expected image_path, caption and image_id") from None
            if not (folder / "images" / image).is_file():
                raise ValueError(f"{source_name}, record {number}: image {image!r} is not among the fetched files")
            converted.append({"image": f"images/{image}", "caption": caption, "image_id": image_id})
        scratch = folder / f".{split_name}.tmp"
        scratch.write_text(json.dumps(converted, indent=1), encoding="utf-8")
        os.replace(scratch, folder / split_name)


def fetch_example_data(
    folder: str | os.PathLike | None = None,
    base_url: str | None = None,
    manifest: str | os.PathLike = MANIFEST_FILE,
    show_progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download the CUSA authors' example data once, check it and convert it; returns the data folder.

    Args:
        folder: where the data is kept (default: ``~/.cache/cusa_hf/coco_example``, or under ``$CUSA_HF_CACHE``).
            A folder that already holds every checked file is returned at once, without any network access.
        base_url: where the files are (default: ``$CUSA_EXAMPLE_DATA_URL``, else the pinned commit of the authors'
            repository); ``http(s)://`` or ``file://``.
        manifest: the ``sha256  size  path`` list of files to fetch (the shipped list by default).
        show_progress: a progress bar over the bytes to download.

    Files already complete are kept; a partial file resumes where it stopped. Every file is checked against the
    manifest's size and SHA-256 before it is used.

    Raises:
        ExampleDataUnavailable: the source cannot be reached (e.g. no network); nothing complete is lost.
        ValueError: a downloaded file does not match its checksum (it is deleted), or the records do not parse.
    """
    folder = Path(folder) if folder is not None else default_example_data_dir()
    base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    entries = read_manifest(manifest)
    stamp = folder / "COMPLETE"
    manifest_sha = _sha256(Path(manifest))
    if stamp.is_file() and stamp.read_text().strip() == manifest_sha and all((folder / s).is_file() for s in SPLITS.values()):
        return folder
    for sub in ("images", "source"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    missing = []
    for entry in entries:
        target = _local_path(folder, entry)
        if not (target.is_file() and target.stat().st_size == entry.size and _sha256(target) == entry.sha256):
            missing.append(entry)
    if missing:
        logger.warning(
            "fetching %d files (%.0f MB) of example data from %s (%s)", len(missing),
            sum(entry.size for entry in missing) / 1e6, base_url, LICENCE,
        )  # fmt: skip
        already = sum(_partial_size(_local_path(folder, entry)) for entry in missing)
        with tqdm(total=sum(entry.size for entry in missing), initial=already, unit="B", unit_scale=True,
                  desc="CUSA example data", disable=not show_progress) as progress:  # fmt: skip
            for entry in missing:
                url = base_url + entry.path
                try:
                    _download(url, _local_path(folder, entry), entry, progress, timeout)
                except urllib.error.HTTPError as error:
                    raise ExampleDataUnavailable(f"cannot fetch {url}: HTTP {error.code} {error.reason}") from None
                except urllib.error.URLError as error:
                    raise ExampleDataUnavailable(f"cannot fetch {url}: {error.reason}") from None
                except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
                    raise ExampleDataUnavailable(f"cannot fetch {url}: {error!r} (run again to resume)") from None
    _convert_records(folder)
    stamp.write_text(manifest_sha + "\n")
    return folder


#: Environment variable naming a coco_mini folder (``train.json``, ``test.json``, images).
COCO_MINI_ENV = "CUSA_COCO_MINI"


def coco_mini_folder() -> Path | None:
    """coco_mini when it is there: ``$CUSA_COCO_MINI``, else ``../shared/data/coco_mini`` beside a source checkout."""
    candidate = Path(os.environ.get(COCO_MINI_ENV, Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"))
    return candidate if (candidate / "train.json").is_file() else None


def default_training_data(fallback_dir: str | os.PathLike) -> tuple[Path, str]:
    """``(folder, description)`` of the built-in default run's data: coco_mini, else the CUSA authors' example data
    (fetched once into the cache), else (offline) generated coloured shapes written under ``fallback_dir``, with a
    warning that such numbers say nothing about real retrieval. The folder holds ``train.json`` and ``test.json``."""
    folder = coco_mini_folder()
    if folder is not None:
        return folder, f"coco_mini ({folder}): 600 train / 201 test MS-COCO images, 5 captions each"
    try:
        folder = fetch_example_data()
        return folder, f"the CUSA authors' example MS-COCO data ({folder}; {LICENCE})"
    except ExampleDataUnavailable as error:
        folder = write_shapes_dataset(Path(fallback_dir) / "generated_shapes")
        logger.warning(
            "coco_mini was not found and the CUSA example data could not be fetched (%s): training on GENERATED "
            "coloured shapes instead. The numbers this run prints say nothing about real image-text retrieval; "
            "set %s or pass train_file/test_file for real data", error, COCO_MINI_ENV,
        )  # fmt: skip
        return folder, f"generated coloured-shapes data ({folder}); no real images could be had"
