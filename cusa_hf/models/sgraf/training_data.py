"""Everything a CUSA run of an SGR/SAF backbone reads: SCAN-format region features as one-row-per-caption datasets,
the word-level tokenizer, the training collator, the validation scorer and the test split (``examples/run_cusa.py``
with ``--backbone sgraf`` or a saved SGRAF folder)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ...data import hold_out_images
from .configuration_sgraf import SgrafConfig
from .evaluation import PROTOCOLS, evaluate_sgraf, sgraf_pairwise_scorer
from .features import RegionFeatureSplit, SgrafDataCollator
from .tokenization_sgraf import SgrafTokenizer

logger = logging.getLogger(__name__)

#: The column of raw image paths that CUSA's image teacher reads (region features are no images).
IMAGE_PATH_COLUMN = "image_path"


@dataclass
class SgrafTrainingData:
    """The datasets and helpers of an SGR/SAF run.

    Attributes:
        splits: ``{"train", "validation"?, "test"?}`` datasets, one row per caption; ``image`` is the row of its
            image's region features.
        tokenizer: the ``SgrafTokenizer`` (also saved as the run's processor).
        collator: ``SgrafDataCollator`` over the training split's region features.
        validation_scorer: ``CusaTrainer(pairwise_scorer=...)`` factory bound to the features the validation rows
            index (the validation split's, or the training split's when validation images are held out from it).
        test: the test split, scored with ``evaluate_sgraf`` under ``protocol`` (:meth:`evaluate_test`).
        fresh_config: ``SgrafConfig`` fields of a fresh model (``None`` when a saved model is fine-tuned).
        description: one line on the data, for the model card.
    """

    splits: dict[str, datasets.Dataset]
    tokenizer: SgrafTokenizer
    collator: SgrafDataCollator
    validation_scorer: Any
    test: RegionFeatureSplit | None
    protocol: str
    fresh_config: dict[str, Any] | None
    description: str

    def evaluate_test(self, model: Any, show_progress: bool = False) -> dict[str, float]:
        """``{"test_i2t_r1", ..., "test_rsum"}`` of a trained ``CusaModel`` (or bare SGRAF model) on the test split,
        under ``protocol``."""
        if self.test is None:
            raise ValueError("this SGRAF data has no test split")
        backbone = getattr(model, "backbone", model)
        test = self.test
        metrics = evaluate_sgraf(
            backbone, test.features, test.captions, test.text_to_image, self.tokenizer, protocol=self.protocol,
            show_progress=show_progress,
        )  # fmt: skip
        return {f"test_{key}": value for key, value in metrics.items()}


def _split_exists(features_dir: str, split: str) -> bool:
    return (Path(features_dir) / f"{split}_ims.npy").is_file()


def _tokenizer(saved_model: str | None, vocab_file: str | None, captions: list[str], training_args: Any) -> SgrafTokenizer:
    """``vocab_file``, else the saved model's vocabulary, else (fresh model) one built from ``captions``."""
    if vocab_file is not None:
        if not Path(vocab_file).is_file():
            raise FileNotFoundError(f"vocab_file={str(vocab_file)!r} does not exist")
        return SgrafTokenizer(vocab_file=vocab_file)
    if saved_model is not None:
        if not (Path(saved_model) / "vocab.json").is_file():
            raise ValueError(
                f"the SGRAF backbone saved_model={str(saved_model)!r} has no vocab.json; pass vocab_file= (the "
                "vocabulary it was trained with: a new one would give its word ids other meanings)"
            )
        return SgrafTokenizer.from_pretrained(saved_model)
    # One process per machine writes the vocabulary; the others read it once it is complete.
    with training_args.main_process_first(desc="SGRAF vocabulary"):
        if training_args.local_process_index == 0:
            return SgrafTokenizer.from_captions(captions, training_args.output_dir)
        return SgrafTokenizer(vocab_file=os.path.join(training_args.output_dir, SgrafTokenizer.vocab_files_names["vocab_file"]))


def load_sgraf_training_data(
    features_dir: str,
    training_args: Any,
    *,
    saved_model: str | None = None,
    fresh_model: dict[str, Any] | None = None,
    vocab_file: str | None = None,
    train_split: str = "train",
    validation_split: str = "validation",
    test_split: str = "test",
    validation_images: int = 0,
    max_train_samples: int | None = None,
    eval_protocol: str = "coco5k",
) -> SgrafTrainingData:
    """Load SCAN-format region features (``{split}_ims.npy``, ``{split}_caps.txt``, ...) for an SGR/SAF run.

    Args:
        features_dir: the folder of the splits' feature and caption files.
        training_args: ``TrainingArguments`` (output folder and process coordination for a new vocabulary).
        saved_model: folder of a saved SGRAF model to fine-tune; ``None`` for a fresh one built from ``fresh_model``.
        fresh_model: ``SgrafConfig`` fields of a fresh model (``module_name``, ``img_dim``, ``embed_size``,
            ``word_dim``, ``sim_dim``); the vocabulary size and region count come from the data.
        vocab_file: the vocabulary (the original ``*_precomp_vocab.json`` or ``{word: id}``); default: the saved
            model's, or one built from the training captions.
        validation_images: without a validation split, hold out this many training images (all their captions).
        eval_protocol: test protocol, one of ``PROTOCOLS``.

    Raises:
        ValueError / FileNotFoundError naming the file, split or size that does not fit, before any training.
    """
    if eval_protocol not in PROTOCOLS:
        raise ValueError(f"eval_protocol={eval_protocol!r}: expected one of {sorted(PROTOCOLS)}")
    if (saved_model is None) == (fresh_model is None):
        raise ValueError("pass exactly one of saved_model (a saved SGRAF folder) or fresh_model (SgrafConfig fields)")
    train = RegionFeatureSplit.load(features_dir, train_split)
    splits = {"train": datasets.Dataset.from_list(train.rows())}
    if _split_exists(features_dir, validation_split):
        validation = RegionFeatureSplit.load(features_dir, validation_split)
        splits["validation"] = datasets.Dataset.from_list(validation.rows())
    elif validation_images > 0:
        validation = train  # the held-out rows index the training features
        splits["train"], splits["validation"] = hold_out_images(splits["train"], validation_images)
    else:
        validation = None
    test = None
    if _split_exists(features_dir, test_split):
        test = RegionFeatureSplit.load(features_dir, test_split)
        folds = PROTOCOLS[eval_protocol]
        if len(test.features) % folds:
            raise ValueError(
                f"eval_protocol={eval_protocol!r} needs the {test_split} images in {folds} equal folds, but "
                f"{features_dir}/{test_split}_ims.npy has {len(test.features)}"
            )
        splits["test"] = datasets.Dataset.from_list(test.rows())
    else:
        logger.warning("no %s/%s_ims.npy: the run has no test evaluation", features_dir, test_split)
    if max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(max_train_samples, len(splits["train"]))))

    num_regions, feature_dim = train.features.shape[1:]
    tokenizer = _tokenizer(saved_model, vocab_file, splits["train"]["caption"], training_args)
    if saved_model is None:
        fresh_config = dict(fresh_model, vocab_size=tokenizer.vocab_size, num_regions=num_regions)
        config, where = SgrafConfig(**fresh_config), "fresh_model['img_dim']"  # validates the fields before any training
    else:
        fresh_config, config = None, SgrafConfig.from_pretrained(saved_model)
        where = f"{saved_model}: num_regions, img_dim"
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(
                f"the vocabulary has {tokenizer.vocab_size} words but {saved_model} was trained with {config.vocab_size}"
            )
    for name, split in (("train", train), ("validation", validation), ("test", test)):
        if split is not None and tuple(split.features.shape[1:]) != (config.num_regions, config.img_dim):
            raise ValueError(
                f"{features_dir}: the {name} features are {tuple(split.features.shape[1:])} (regions, dim) per image "
                f"but the model takes ({config.num_regions}, {config.img_dim}) ({where})"
            )
    return SgrafTrainingData(
        splits=splits,
        tokenizer=tokenizer,
        collator=SgrafDataCollator(tokenizer, train.features),
        validation_scorer=None if validation is None else sgraf_pairwise_scorer(validation.features, tokenizer),
        test=test,
        protocol=eval_protocol,
        fresh_config=fresh_config,
        description=(
            f"SCAN-format region features from {features_dir} ({len(train.features)} {train_split} images of "
            f"{num_regions} x {feature_dim}), test protocol {eval_protocol}"
        ),
    )


def with_image_paths(dataset: datasets.Dataset, image_root: str | None, where: str) -> datasets.Dataset:
    """Add ``image_path`` (:data:`IMAGE_PATH_COLUMN`) = ``image_root / image_id``, the raw image of each region-feature row, which CUSA's image
    teacher reads (``where`` names the file the image ids came from, for the error messages)."""
    if image_root is None:
        raise ValueError(
            "CUSA's image teacher reads the raw images: pass image_root=, the folder holding the files named in "
            f"{where}"
        )
    image_ids = list(dict.fromkeys(dataset["image_id"]))
    missing = [image_id for image_id in image_ids if not (Path(image_root) / str(image_id)).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(image_ids)} images named by {where} are not under image_root={str(image_root)!r} "
            f"(first: {Path(image_root) / str(missing[0])}); the ids must be image file names relative to image_root"
        )
    root = Path(image_root).resolve()
    return dataset.add_column(IMAGE_PATH_COLUMN, [str(root / str(image_id)) for image_id in dataset["image_id"]])
