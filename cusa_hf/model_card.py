"""Model cards for CUSA checkpoints: ``huggingface_hub.ModelCard`` rendered from ``model_card_template.md``, filled
by a callback of ``CusaTrainer`` (as sentence-transformers fills its cards), so every trainer writes one.

The metadata is what the Hub indexes: ``base_model`` (the backbone, when it is a Hub model), ``datasets`` (the Hub
datasets trained and evaluated on), ``license``, ``library_name``, ``tags`` and a ``model-index`` holding every
retrieval metric (i2t / t2i R@1/5/10 and RSUM) of the validation and test splits as ``EvalResult`` entries. The text
says what was trained (CUSA, or the baseline of its contrastive term alone, InfoNCE or sigmoid, with no CSA, USA or teachers), on what, with which loss settings
and teachers, how well, how to use it, and the command that reproduces it.

* :class:`CusaModelCardData`: what a run knows that the model does not (its backbone's name, its data, its command);
  ``CusaTrainer(model_card_data=...)`` takes it.
* :class:`CusaModelCardCallback`: the trainer's callback; it keeps the retrieval metrics logged for the
  ``validation`` and ``test`` splits (``trainer.evaluate(split, metric_key_prefix="test")``), and the trainer writes the
  card as ``README.md`` wherever it saves the model and before ``push_to_hub`` uploads.
* :func:`render_model_card`: the card itself, from a config, metrics and the run's facts.

Example::

    >>> from huggingface_hub import ModelCard
    >>> card = render_model_card(model.config, {"test_rsum": 331.6, ...}, "me/clip-cusa",
    ...                          CusaModelCardData(backbone="openai/clip-vit-base-patch32", training_data="COCO"))
    >>> metrics_from_eval_results(card.data.eval_results)["test_rsum"]
    331.6
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import TrainerCallback

from .backbone_recipes import named_backbone_recipe
from .backbones import BackboneAdapter, adapter_class_for
from .configuration_cusa import LOSS, cusa_field_names
from .contrastive_terms import contrastive_term_class
from .evaluation.metric_registry import MetricInfo, metric_info, registered_metrics
from .modeling_cusa import is_cusa_checkpoint

#: The card's text, a Jinja template (``huggingface_hub.ModelCard.from_template``); installed with the package.
TEMPLATE_PATH = Path(__file__).parent / "model_card_template.md"
#: The tag that marks a card written here.
CARD_TAG = "cusa-hf"
#: The run's evaluated splits, as its metric keys are prefixed: validation (model selection) and test (once).
EVAL_SPLITS = ("validation", "test")


def card_metric(key: str) -> tuple[str, MetricInfo] | None:
    """``(split, metric)`` of a logged key the card reports (``test_i2t_r1``: a split of :data:`EVAL_SPLITS` and a
    metric of ``cusa_hf.evaluation.metric_registry``), else ``None``."""
    split, _, name = key.partition("_")
    info = metric_info(name) if split in EVAL_SPLITS else None
    return None if info is None else (split, info)


@dataclass
class CusaModelCardData:
    """What a model card says about a run beyond its model's config and metrics.

    Args:
        backbone: what the model was built from: a Hub name (becomes ``base_model``), a local folder (a saved CUSA
            checkpoint is named as the model it was fine-tuned further from) or the built-in / ``sgraf`` backbone.
            ``None``: the name the backbone's config was loaded from, if any.
        training_data: a sentence on the training data.
        command: the command that trained it (the card then shows it).
        data_args: the run's ``DataArguments``: names the evaluated datasets in the model-index and the Hub datasets
            in ``datasets``; without it the results are filed under a ``custom`` dataset.
        license: a Hub license id; ``"other"`` by default, as the weights carry the terms of the backbone and data.
        fresh_heads: the model kept only the backbone of the CUSA checkpoint ``backbone`` names, with fresh projectors,
            heads and temperatures (``CusaModel.from_backbone(..., fresh_heads=True)``).
    """

    backbone: str | None = None
    training_data: str | None = None
    command: str | None = None
    data_args: Any = None
    license: str = "other"
    fresh_heads: bool = False


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
    """The card's ``base_model``: the backbone's Hub name; ``None`` for a local folder or a name a backbone recipe
    registered (the built-in student, a new SGR/SAF model)."""
    return None if named_backbone_recipe(backbone) is not None else hub_repo_name(backbone)


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


def card_eval_results(
    metrics: dict[str, float], datasets: dict[str, tuple[str, str]] | None = None
) -> list[EvalResult]:
    """One ``EvalResult`` per registered metric in ``metrics`` (keys like ``test_i2t_r1``, values in percent), with
    the label and task the registry gives it.

    ``dataset_split`` is the run's split (``validation`` or ``test``), ``metric_type`` the metric's key without it
    (``i2t_r1``, ``rsum``, ``itc_i2t_r1``), so :func:`metrics_from_eval_results` gives the keys back. ``datasets``
    maps a split to ``(dataset_type, dataset_name)`` (see :func:`eval_datasets`); a split without one is ``custom``.
    A NaN or infinite metric is left out, with a warning naming it.
    """
    non_finite = [key for key in sorted(metrics) if card_metric(key) and not math.isfinite(metrics[key])]
    if non_finite:
        warnings.warn(
            f"{', '.join(f'{key} = {metrics[key]}' for key in non_finite)}: not finite numbers (the model or its "
            "evaluation diverged); left out of the card's model-index, which holds numbers only, and shown as they are "
            "in its results table",
            stacklevel=2,
        )
    results = []
    for split in EVAL_SPLITS:
        dataset_type, dataset_name = (datasets or {}).get(split, ("custom", f"custom data ({split} split)"))
        for info in registered_metrics():
            key = f"{split}_{info.name}"
            if key not in metrics or key in non_finite:
                continue
            results.append(
                EvalResult(
                    task_type=info.task_type,
                    task_name=info.task_name,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=info.name,
                    metric_name=info.label,
                    metric_value=float(metrics[key]),
                )
            )
    return results


def metrics_from_eval_results(eval_results: Iterable[EvalResult]) -> dict[str, float]:
    """The metric dict that :func:`card_eval_results` was built from (``{"test_rsum": ..., ...}``)."""
    return {f"{result.dataset_split}_{result.metric_type}": result.metric_value for result in eval_results}


def _objective(config: Any) -> str:
    """What the model was trained with: ``CUSA``, ``CSA``, ``USA`` or the contrastive term alone, ``baseline``."""
    terms = [name for name, active in (("CSA", config.csa_active), ("USA", config.usa_active)) if active]
    return "CUSA" if len(terms) == 2 else terms[0] if terms else "baseline"


def _tokenizer_options(adapter_class: type[BackboneAdapter]) -> str:
    """The usage snippet's tokenizer keywords: the backbone's padding (and its fixed caption length, SigLIP's 64)."""
    options = f'padding="{adapter_class.text_padding}", truncation=True'
    if adapter_class.trained_caption_length is not None:
        options += f", max_length={adapter_class.trained_caption_length}"
    return options


def _backbone_text(backbone: str | None, model_type: str, fresh_heads: bool = False) -> str:
    if backbone and fresh_heads:
        return (
            f"the backbone of the CUSA checkpoint `{backbone}` (its trained `{model_type}` towers and their "
            "projections; CUSA's projectors, heads and temperatures started fresh)"
        )
    if not backbone:
        return f"a `{model_type}` backbone"
    recipe = named_backbone_recipe(backbone)
    if recipe is not None and recipe.card_text:
        return recipe.card_text
    if base_model_id(backbone):
        return f"[`{backbone}`](https://huggingface.co/{backbone}) (`{model_type}`)"
    if os.path.isdir(backbone) and is_cusa_checkpoint(backbone):
        return f"the CUSA checkpoint `{backbone}` (a `{model_type}` backbone with CUSA's heads), fine-tuned further"
    return f"a local `{model_type}` checkpoint (`{backbone}`)"


def _results_tables(metrics: dict[str, float]) -> list[tuple[str, list[str], list[tuple[str, list[str]]]]]:
    """The card's results tables, one per registry table that has metrics: ``(table, columns, rows)``, a row
    ``(split and variant label, formatted values)`` for each split and variant that has metrics."""
    layout: dict[str, dict[str, dict[str, str]]] = {}  # table -> variant -> column -> metric name
    for info in registered_metrics():
        layout.setdefault(info.table, {}).setdefault(info.variant, {})[info.column] = info.name
    tables = []
    for table, variants in layout.items():
        columns = list(dict.fromkeys(column for names in variants.values() for column in names))
        rows = []
        for split in EVAL_SPLITS:
            for variant, names in variants.items():
                keys = [f"{split}_{names[column]}" if column in names else None for column in columns]
                if any(key in metrics for key in keys):
                    values = [f"{metrics[key]:.2f}" if key in metrics else "" for key in keys]
                    rows.append((f"{split}{variant}", values))
        if rows:
            tables.append((table, columns, rows))
    return tables


def render_model_card(
    config: Any,
    metrics: dict[str, float],
    repo_id: str,
    card_data: CusaModelCardData | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card of a CUSA checkpoint (or of the contrastive-term baseline, when ``config`` has no active CSA / USA).

    Args:
        config: the model's ``CusaConfig`` (loss settings, ``teacher_info``, the backbone's config).
        metrics: ``{f"{split}_{metric}": value}`` in percent for ``split`` in validation / test (e.g. what
            ``CusaTrainer.evaluate`` returns); other keys are ignored.
        repo_id: where the model loads from: the Hub repository the card is for, or a local folder (the usage
            snippet loads it).
        card_data: the run's facts (:class:`CusaModelCardData`).
        model_name: the card's title and model-index name (default: the last part of ``repo_id``).

    Returns:
        ``huggingface_hub.ModelCard`` (``str(card)`` is the README text, ``card.data`` its metadata).
    """
    card_data = card_data or CusaModelCardData()
    backbone_config = config.backbone_config
    backbone = card_data.backbone or getattr(backbone_config, "_name_or_path", None) or None
    objective = _objective(config)
    model_type = backbone_config.model_type
    adapter_class = adapter_class_for(model_type)
    itc_label = contrastive_term_class(config.itc_loss or adapter_class.default_itc_loss).label
    data_args = card_data.data_args
    name = model_name or Path(repo_id).name
    hub_metadata = ModelCardData(
        base_model=base_model_id(backbone) if backbone else None,
        datasets=(hub_datasets(data_args) or None) if data_args is not None else None,
        license=card_data.license,
        library_name="transformers",
        tags=[CARD_TAG, "cusa" if objective != "baseline" else f"{itc_label.lower()}-baseline", "image-text-retrieval",
              "cross-modal-retrieval", model_type],  # fmt: skip
        metrics=["recall"],
        model_name=name,
        eval_results=card_eval_results(metrics, None if data_args is None else eval_datasets(data_args)) or None,
    )
    return ModelCard.from_template(
        hub_metadata,
        template_path=TEMPLATE_PATH,
        model_name=name,  # the card data keeps it only inside the model-index
        objective=objective,
        itc_label=itc_label,
        tokenizer_options=_tokenizer_options(adapter_class),
        backbone_text=_backbone_text(backbone, model_type, card_data.fresh_heads),
        csa_active=config.csa_active,
        usa_active=config.usa_active,
        csa_weight=config.csa_weight,
        usa_weight=config.usa_weight,
        model_type=model_type,
        repo_id=repo_id,
        has_usa_heads=config.use_usa,
        training_data=card_data.training_data or "Not recorded.",
        results_tables=_results_tables(metrics),
        loss_settings=[(name, getattr(config, name)) for name in cusa_field_names(LOSS)],
        teachers=list((config.teacher_info or {}).items()),
        command=card_data.command,
    )


class CusaModelCardCallback(TrainerCallback):
    """Fills the model card of a ``CusaTrainer`` run: keeps the retrieval metrics logged for the validation and test
    splits (the latest of each), which :meth:`write` renders with the model's config and the run's
    :class:`CusaModelCardData`."""

    def __init__(self, card_data: CusaModelCardData | None = None):
        self.card_data = card_data or CusaModelCardData()
        self.metrics: dict[str, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        self.metrics.update({key: value for key, value in (logs or {}).items() if card_metric(key)})

    def write(self, output_dir: str, config: Any, repo_id: str | None = None) -> str:
        """Write the card as ``README.md`` into ``output_dir`` and return its path. Without ``repo_id`` (a model not
        pushed) the card describes the folder: its usage snippet loads ``output_dir``."""
        model_name = None if repo_id else Path(output_dir).absolute().name
        card = render_model_card(config, self.metrics, repo_id or output_dir, self.card_data, model_name)
        path = os.path.join(output_dir, "README.md")
        card.save(path)
        return path
