"""The recipe of SGR/SAF runs (``backbone="sgraf"`` for a fresh model, or a saved SGRAF folder): SCAN-format region
features instead of images, the word-level tokenizer as the processor, SGRAF's collator, pairwise scoring for
validation and the test split under ``eval_protocol`` (docs/sgraf.md)."""

from __future__ import annotations

from typing import Any

from ...backbone_recipes import BackboneRecipe, RunData, register_backbone_recipe
from .configuration_sgraf import SGRAF_BACKBONE, SgrafConfig
from .modeling_sgraf import SgrafModel
from .training_data import IMAGE_PATH_COLUMN, load_sgraf_training_data, with_image_paths

#: The ``ModelArguments`` fields of a fresh model's ``SgrafConfig`` (``sgraf_<field>``; unset: SgrafConfig's default).
FRESH_MODEL_FIELDS = ("module_name", "img_dim", "embed_size", "word_dim", "sim_dim")


def fresh_model_fields(model_args: Any) -> dict[str, Any]:
    """The ``SgrafConfig`` fields a run sets for a fresh model (``sgraf_<field>`` of ``ModelArguments``; those left
    unset take SgrafConfig's defaults)."""
    values = {name: getattr(model_args, f"sgraf_{name}") for name in FRESH_MODEL_FIELDS}
    return {name: value for name, value in values.items() if value is not None}


class SgrafRecipe(BackboneRecipe):
    """SGR/SAF on precomputed region features (``DataArguments.features_dir``)."""

    card_text = "a new SGR/SAF model (`sgraf`, trained from scratch on region features)"

    def check(self, model_args: Any) -> None:
        if model_args.freeze_vision_tower or model_args.freeze_text_tower:
            raise ValueError("freeze_vision_tower / freeze_text_tower apply to dual encoders, not to SGRAF backbones")

    def new_backbone(self, model_args: Any) -> Any:
        if model_args.backbone == SGRAF_BACKBONE:
            raise ValueError(
                f"backbone={SGRAF_BACKBONE!r} is a fresh SGRAF model, whose vocabulary size and region count come from "
                "the run's data: build it with load_run_data(...).new_backbone()"
            )
        return model_args.backbone

    def load_run_data(self, model_args: Any, data_args: Any, training_args: Any) -> RunData:
        """The region-feature splits, tokenizer, collator and scorers of an SGR/SAF run; with teachers (CUSA's
        ``needs_teachers``), the training rows' raw image paths under ``image_root`` for the image teacher."""
        self.check(model_args)
        if data_args.streaming:
            raise ValueError("streaming is for image-caption data; SGRAF backbones read precomputed region features")
        if data_args.features_dir is None:
            raise ValueError(f"backbone={model_args.backbone!r} (SGRAF) reads precomputed region features: set features_dir")
        fresh = model_args.backbone == SGRAF_BACKBONE
        data = load_sgraf_training_data(
            data_args.features_dir,
            training_args,
            saved_model=None if fresh else model_args.backbone,
            fresh_model=fresh_model_fields(model_args) if fresh else None,
            vocab_file=model_args.sgraf_vocab_file,
            train_split=data_args.train_split,
            validation_split=data_args.validation_split,
            test_split=data_args.test_split,
            validation_images=data_args.validation_images,
            max_train_samples=data_args.max_train_samples,
            eval_protocol=data_args.eval_protocol,
        )
        teacher_image_column = IMAGE_PATH_COLUMN
        if training_args.needs_teachers:
            ids_file = f"{data_args.features_dir}/{data_args.train_split}_image_ids.txt"
            data.splits["train"] = with_image_paths(data.splits["train"], data_args.image_root, ids_file)

        def test_metrics(trainer: Any, test_split: Any) -> dict[str, float]:
            """The test split under the run's protocol (from its region features), logged (the model card reads the
            logs)."""
            model = trainer.accelerator.unwrap_model(trainer.model)
            metrics = data.evaluate_test(model, not trainer.args.disable_tqdm)
            trainer.log(metrics)
            return metrics

        return RunData(
            splits=data.splits,
            processor=data.tokenizer,
            description=data.description,
            new_backbone=(lambda: SgrafModel(SgrafConfig(**data.fresh_config))) if fresh else (lambda: model_args.backbone),
            collator=data.collator,
            teacher_image_column=teacher_image_column,
            evaluator_settings={"pairwise_scorer": data.validation_scorer},
            test_metrics=test_metrics,
        )


register_backbone_recipe(SgrafRecipe(), names=(SGRAF_BACKBONE,), model_types=(SgrafConfig.model_type,))
