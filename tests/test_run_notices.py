"""Notices every CPU run printed that the package caused, and which are gone: torch's pin_memory warning (pinning is
off without an accelerator) and the Trainer's "new PAD/BOS/EOS tokens" warning (CusaTrainer copies the tokenizer's
special tokens into a config that has none)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_clip_processor, tiny_cusa_model

from cusa_hf import CusaTrainer, CusaTrainingArguments, cusa_training_arguments


@pytest.mark.parametrize("accelerator", [False, True])
def test_memory_is_pinned_only_with_an_accelerator(monkeypatch, tmp_path, accelerator):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    assert CusaTrainingArguments(output_dir=str(tmp_path)).dataloader_pin_memory is accelerator


def trainer_notices(model, tmp_path, caplog) -> str:
    """What a CusaTrainer with the tiny CLIP processor logs when it aligns the special tokens, as ``train()`` does
    first (transformers' own handler writes to the stream it found at import: its records are read through the root
    logger)."""
    from transformers.trainer_utils import align_special_tokens
    from transformers.utils import logging as transformers_logging

    trainer = CusaTrainer(model=model, args=cusa_training_arguments(str(tmp_path), report_to="none", use_cpu=True),
                          processing_class=tiny_clip_processor())  # fmt: skip
    caplog.clear()
    transformers_logging.enable_propagation()
    try:
        align_special_tokens(trainer.model, trainer.processing_class)
    finally:
        transformers_logging.disable_propagation()
    return caplog.text


def test_the_tokenizers_special_tokens_reach_the_config_without_a_warning(tmp_path, caplog):
    model = tiny_cusa_model()
    assert "PAD/BOS/EOS" not in trainer_notices(model, tmp_path, caplog)
    tokenizer = tiny_clip_processor().tokenizer
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name, None) == getattr(tokenizer, name), name
    assert model.config.pad_token_id == 0


def test_a_config_that_holds_another_token_is_still_aligned_by_the_trainer_with_its_warning(tmp_path, caplog):
    model = tiny_cusa_model()
    model.config.pad_token_id = 7
    assert "PAD/BOS/EOS" in trainer_notices(model, tmp_path, caplog)
    assert model.config.pad_token_id == tiny_clip_processor().tokenizer.pad_token_id
