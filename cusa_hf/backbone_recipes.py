"""Backbone recipes: what a backbone family needs around ``CusaModel`` in a run, registered once per family.

An adapter (``cusa_hf.backbones``) says how ``CusaModel`` drives a backbone; a recipe says what a run of it reads and
builds: its data and processor, the backbone handed to ``CusaModel.from_backbone``, the collator and the evaluation
settings (:class:`RunData`). The ``backbone`` string of a run is resolved once, by :func:`backbone_recipe`: a name a
recipe registered (``register_backbone_recipe(recipe, names=...)``), else a Hub name or folder whose model type
selects a recipe (``model_types=...``) or, by default, :class:`BackboneRecipe` itself (a pretrained backbone trained
on image-caption data with its own ``AutoProcessor``).

The built-in student's recipe lives in ``cusa_hf.models.builtin_student``, SGR/SAF's in
``cusa_hf.models.sgraf.recipe``; importing ``cusa_hf`` registers them.

    >>> recipe = backbone_recipe("openai/clip-vit-base-patch32")   # fails fast on a name that cannot be loaded
    >>> run_data = recipe.load_run_data(model_args, data_args, training_args)
    >>> model = CusaModel.from_backbone(run_data.new_backbone(), csa_weight=0.1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from transformers import AutoConfig, AutoProcessor

from .backbones import adapter_class_for
from .configuration_cusa import CusaConfig
from .data import load_splits
from .example_data import default_training_data
from .modeling_cusa import check_model_folder
from .schema import IMAGE_COLUMN


@dataclasses.dataclass
class RunData:
    """What a recipe gives a run, before any model is built.

    Attributes:
        splits: ``{"train", "validation"?, "test"?}`` datasets, one row per caption.
        processor: saved with the model and given to the collator and evaluator (a tokenizer alone for backbones
            that read no pixels).
        description: one line on the training data, for the model card.
        new_backbone: builds the backbone for ``CusaModel.from_backbone`` (a model, or a name/path it loads); called
            once per trained model, after the run's seed is set.
        collator: the training collator; ``None``: ``CusaTrainer`` builds a ``CusaDataCollator`` from the processor.
        teacher_image_column: the column of raw images that the image teacher reads.
        evaluator_settings: ``RetrievalEvaluator`` settings the family needs (e.g. ``pairwise_scorer``).
        test_metrics: ``test_metrics(trainer, test_split) -> {"test_...": value}``, the test split's metrics (the
            split as the run trains on it, e.g. with cached frozen-tower columns); the default evaluates it through
            the trainer's evaluator.
    """

    splits: dict[str, Any]
    processor: Any
    description: str | None
    new_backbone: Callable[[], Any]
    collator: Any = None
    teacher_image_column: str = IMAGE_COLUMN
    evaluator_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    test_metrics: Callable[[Any, Any], dict[str, float]] = lambda trainer, test_split: trainer.evaluate(
        test_split, metric_key_prefix="test"
    )


class BackboneRecipe:
    """The recipe of a pretrained backbone loaded by name or folder (CLIP, dual encoders, X2-VLM, BLIP): image-caption
    splits (``cusa_hf.data.load_splits``; without ``train_file`` the built-in data), its ``AutoProcessor``, the
    backbone loaded by ``CusaModel.from_backbone``. Families subclass it and override what differs.

    Attributes:
        card_text: how a model card names a backbone of this recipe's registered names (``None``: by its name).
        takes_projection_dim: the recipe builds the backbone's projections itself, ``ModelArguments.projection_dim``
            wide; other backbones keep their own width, and a run that sets it for them is refused.
    """

    card_text: str | None = None
    takes_projection_dim: bool = False

    def check(self, model_args: Any) -> None:
        """Refuse settings this family cannot run, before anything slow."""

    def processor(self, model_args: Any) -> Any:
        """The processor (``image_processor`` + ``tokenizer``) of ``model_args.backbone`` (or ``processor_name``)."""
        return AutoProcessor.from_pretrained(model_args.processor_name or model_args.backbone)

    def new_backbone(self, model_args: Any) -> Any:
        """The backbone that ``CusaModel.from_backbone`` takes: here the name or folder it loads."""
        return model_args.backbone

    def load_run_data(self, model_args: Any, data_args: Any, training_args: Any) -> RunData:
        """The processor and splits of a run of ``model_args.backbone`` (``ModelArguments``, ``DataArguments``,
        ``CusaTrainingArguments``); without ``train_file`` the built-in data (``default_training_data``), whose files
        are then recorded in ``data_args``."""
        self.check(model_args)
        if data_args.features_dir is not None:
            raise ValueError(f"features_dir is for backbones that read region features; {model_args.backbone!r} reads images")
        processor = self.processor(model_args)
        description = data_args.train_file
        if data_args.train_file is None:
            folder, description = default_training_data(training_args.output_dir)
            data_args.train_file = str(folder / "train.json")
            data_args.test_file = data_args.test_file or str(folder / "test.json")
        splits = load_splits(data_args)
        return RunData(splits, processor, description, new_backbone=lambda: self.new_backbone(model_args))


_NAMED_RECIPES: dict[str, BackboneRecipe] = {}
_MODEL_TYPE_RECIPES: dict[str, BackboneRecipe] = {}


def register_backbone_recipe(
    recipe: BackboneRecipe, names: tuple[str, ...] = (), model_types: tuple[str, ...] = ()
) -> BackboneRecipe:
    """Register ``recipe`` for backbone ``names`` (strings that name no model to load, like the built-in student's)
    and for the saved backbones of ``model_types``."""
    if not names and not model_types:
        raise ValueError(f"{type(recipe).__name__}: register it for some names or model_types")
    _NAMED_RECIPES.update(dict.fromkeys(names, recipe))
    _MODEL_TYPE_RECIPES.update(dict.fromkeys(model_types, recipe))
    return recipe


def named_backbone_recipe(backbone: str | None) -> BackboneRecipe | None:
    """The recipe registered under the name ``backbone``, or ``None`` (a Hub name, a folder); loads nothing."""
    return _NAMED_RECIPES.get(backbone) if isinstance(backbone, str) else None


def backbone_recipe(backbone: str) -> BackboneRecipe:
    """The recipe of a run's ``backbone`` string, resolved once: a registered name, else the model type of the
    config it loads (a saved CUSA checkpoint by the backbone it wraps), which must have an adapter.

    Raises:
        ValueError: the name loads no config (not a local folder, not on the Hub), or its model type has no adapter.
    """
    named = named_backbone_recipe(backbone)
    if named is not None:
        return named
    check_model_folder(backbone, "backbone")
    try:
        config = AutoConfig.from_pretrained(backbone)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load backbone={backbone!r}: not a local model folder and not reachable on the Hub "
            f"({str(error).splitlines()[0]})"
        ) from None
    if config.model_type == CusaConfig.model_type:
        config = config.backbone_config
    adapter_class_for(config.model_type)
    return _MODEL_TYPE_RECIPES.get(config.model_type, _PRETRAINED)


_PRETRAINED = BackboneRecipe()
