"""Settings that used to go on silently with a wrong result now stop with a message that names the problem."""

import pytest
import torch
from tiny_models import synthetic_dataset, tiny_clip_config, tiny_clip_processor, tiny_cusa_model

from cusa_hf import CusaModel, CusaTrainer, cusa_training_arguments, encode_texts


def test_from_pretrained_refuses_a_folder_that_is_not_a_cusa_checkpoint(tmp_path):
    from transformers import CLIPModel

    CLIPModel(tiny_clip_config()).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"holds a 'clip' model .*not a CUSA checkpoint.*CusaModel\.from_backbone"):
        CusaModel.from_pretrained(tmp_path / "clip")
    tiny_cusa_model(0).save_pretrained(tmp_path / "cusa")
    assert isinstance(CusaModel.from_pretrained(tmp_path / "cusa"), CusaModel)


def test_a_contrastive_batch_of_one_pair_is_refused(tmp_path):
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    model = tiny_cusa_model(0, use_csa=False, use_usa=False)

    def trainer(**overrides):
        args = cusa_training_arguments(str(tmp_path), use_cpu=True, report_to=[], **overrides)
        return CusaTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_clip_processor())

    with pytest.raises(ValueError, match="per_device_train_batch_size=1 gives contrastive batches of 1 pair"):
        trainer(per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="8 training rows in batches of 7 leave a last batch of one pair"):
        trainer(per_device_train_batch_size=7)
    trainer(per_device_train_batch_size=7, dataloader_drop_last=True)
    # Under max_steps the epochs repeat: the one-pair batch comes at step 2, so max_steps=2 is refused before training.
    with pytest.raises(ValueError, match=r"leave a last batch of one pair \(max_steps=2 reaches it\)"):
        trainer(per_device_train_batch_size=7, max_steps=2)
    trainer(per_device_train_batch_size=7, max_steps=1)
    with pytest.raises(ValueError, match="the training set has 1 row"):
        CusaTrainer(model=model, args=cusa_training_arguments(str(tmp_path), use_cpu=True, report_to=[]),
                    train_dataset=dataset.select([0]), processing_class=tiny_clip_processor())  # fmt: skip
    # A custom loop gets the same answer from the model itself.
    processor = tiny_clip_processor()
    inputs = processor(text=["a red cat"], images=[dataset[0]["image"]], return_tensors="pt")
    with pytest.raises(ValueError, match="at least two image-text pairs, got 1"):
        model.train()(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], return_loss=True)


def test_a_cusa_head_is_refused_for_a_model_without_cusa_heads():
    from transformers import CLIPModel

    torch.manual_seed(0)
    plain = CLIPModel(tiny_clip_config())
    tokenizer = tiny_clip_processor().tokenizer
    with pytest.raises(ValueError, match="head='uni' selects a CusaModel's embeddings, but CLIPModel.get_text_features"):
        encode_texts(plain, ["a red cat"], tokenizer, head="uni", show_progress=False)
    assert encode_texts(plain, ["a red cat"], tokenizer, head=None, show_progress=False).shape == (1, 16)


def test_resuming_needs_a_complete_checkpoint(tmp_path, caplog):
    import logging

    from cusa_hf.checkpoints import last_complete_checkpoint

    with pytest.raises(FileNotFoundError, match="output folder .*absent does not exist"):
        last_complete_checkpoint(tmp_path / "absent")
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="nothing to resume in .*run: it holds no complete checkpoint-N folder"):
        last_complete_checkpoint(tmp_path / "run")
    for step in (2, 4, 10):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir()
    for step in (2, 4):
        (tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-4")
    assert "checkpoint-10: it has no trainer_state.json, so its saving was cut off" in caplog.text
    # kill -9 while checkpoint-12's trainer_state.json was half written: skipped, naming the file.
    (tmp_path / "run" / "checkpoint-12").mkdir()
    (tmp_path / "run" / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 12, "log_hist')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-4")
    assert "checkpoint-12/trainer_state.json does not read whole" in caplog.text
    from cusa_hf.checkpoints import check_resumable

    tiny_cusa_model(0).save_pretrained(tmp_path / "run" / "checkpoint-12")
    with pytest.raises(OSError, match=r"resume from .*checkpoint-12: its .*trainer_state.json does not read whole"):
        check_resumable(tmp_path / "run" / "checkpoint-12", tiny_cusa_model(0).config)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"csa_wieght": 0.0}, r"unknown keyword\(s\) 'csa_wieght' \(did you mean 'csa_weight'\?\)"),
        ({"use_csa": "no"}, r"use_csa must be True or False, got 'no'"),
        ({"csa_weight": float("nan")}, r"csa_weight must be a finite number, got nan"),
        ({"usa_weight": float("inf")}, r"usa_weight must be a finite number, got inf"),
        ({"itc_temperature": float("nan")}, r"itc_temperature must be a finite number"),
    ],
)
def test_cusa_config_refuses_typos_truthy_strings_and_non_finite_numbers(fields, message):
    from cusa_hf import CusaConfig

    with pytest.raises(ValueError, match=message):
        CusaConfig(**fields)


def test_a_saved_config_still_loads(tmp_path):
    from cusa_hf import CusaConfig

    tiny_cusa_model(0, csa_weight=0.3, tower_dropout=0.1).save_pretrained(tmp_path)
    config = CusaConfig.from_pretrained(tmp_path)
    assert (config.csa_weight, config.tower_dropout) == (0.3, 0.1)


def test_an_earlier_run_is_never_overwritten_unless_asked(tmp_path):
    from cusa_hf.checkpoints import claim_output_dir

    claim_output_dir(tmp_path / "new").release()  # a folder that does not exist yet
    run = tmp_path / "run"
    with claim_output_dir(run):  # a run writes its checkpoint and results (and records them) while it holds the folder
        (run / "checkpoint-4").mkdir(parents=True)
        (run / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-4, results.json\); pass overwrite_output_dir"):
        claim_output_dir(run)
    claim_output_dir(run, resume_from_checkpoint="last").release()
    assert (run / "results.json").exists()
    claim_output_dir(run, overwrite=True).release()
    assert run.is_dir() and not any(run.iterdir())


def test_clearer_errors_for_bad_files_and_settings(tmp_path):
    import os
    import sys
    from pathlib import Path

    from cusa_hf.arguments import parse_arguments
    from cusa_hf.data import load_json_dataset
    from cusa_hf.images import BadImageError, load_image

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import run_cusa

    (tmp_path / "latin1.json").write_bytes(b'[{"image": "a.jpg", "caption": "caf\xe9"}]')
    with pytest.raises(ValueError, match="latin1.json: not UTF-8 text"):
        load_json_dataset(tmp_path / "latin1.json", check_files=False)
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(BadImageError, match="pipe.jpg.*not a regular file"):
        load_image(str(tmp_path / "pipe.jpg"))
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ValueError, match="empty.yaml: expected a mapping .*NoneType \\(the file is empty\\)"):
        parse_arguments([str(tmp_path / "empty.yaml")])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping of setting names to values, got list"):
        parse_arguments([str(tmp_path / "list.yaml")])
    with pytest.raises(ValueError, match="use_csa must be True or False|csa_weight must be"):
        run_cusa.main(["--csa_weight", "nan", "--output_dir", str(tmp_path / "out")])


def test_a_config_file_that_does_not_parse_names_the_file_and_line(tmp_path):
    from cusa_hf.arguments import parse_arguments

    (tmp_path / "broken.yaml").write_text("csa_weight: 0.2\nusa_weight: [0.5\nseed: 3\n")
    with pytest.raises(ValueError, match=r"broken.yaml: not valid YAML \(.*\) at line 3, column 5"):
        parse_arguments([str(tmp_path / "broken.yaml")])
    (tmp_path / "latin1.yaml").write_bytes(b"output_dir: caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.yaml: not UTF-8 text \(byte 15: invalid continuation byte\)"):
        parse_arguments([str(tmp_path / "latin1.yaml")])
    (tmp_path / "broken.json").write_text('{"csa_weight": 0.2,}')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(.*line 1 column 20"):
        parse_arguments([str(tmp_path / "broken.json")])


def test_a_cut_off_weights_file_is_named_when_loading_and_resuming(tmp_path):
    from transformers import AutoModel

    from cusa_hf.checkpoints import check_resumable

    model = tiny_cusa_model(0)
    model.save_pretrained(tmp_path / "checkpoint-2")
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    named = rf"{weights}: the weights file is damaged \(.*\); it was cut off or corrupted"
    with pytest.raises(OSError, match=named):
        CusaModel.from_pretrained(tmp_path / "checkpoint-2")
    with pytest.raises(OSError, match=named):
        AutoModel.from_pretrained(tmp_path / "checkpoint-2")
    with pytest.raises(OSError, match=rf"cannot resume from .*checkpoint-2: {named}"):
        check_resumable(tmp_path / "checkpoint-2", model.config)


def test_a_setting_given_twice_in_a_config_file_is_refused_naming_key_and_lines(tmp_path):
    from cusa_hf.arguments import parse_arguments

    (tmp_path / "twice.yaml").write_text("backbone: x\nlearning_rate: 0.001\ncsa_weight: 0.1\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"twice.yaml: not valid YAML \(duplicate key 'learning_rate' \(first given at "
                                         r"line 2; only one may stay\)\) at line 4"):  # fmt: skip
        parse_arguments([str(tmp_path / "twice.yaml")])
    (tmp_path / "twice.json").write_text('{\n  "backbone": "x",\n  "learning_rate": 0.001,\n  "learning_rate": 0.1\n}')
    with pytest.raises(ValueError, match=r"twice.json: key 'learning_rate' is given twice \(lines 3, 4\)"):
        parse_arguments([str(tmp_path / "twice.json")])


def test_projection_dim_with_a_backbone_it_does_not_shape_is_refused(tmp_path):
    from cusa_hf.arguments import parse_arguments
    from cusa_hf.backbone_recipes import backbone_recipe

    with pytest.raises(ValueError, match=r"projection_dim=8 sets the projection width of the built-in dual encoder .*"
                                         r"backbone='.*ckpt' keeps its own width"):  # fmt: skip
        parse_arguments(["--backbone", str(tmp_path / "ckpt"), "--projection_dim", "8", "--output_dir", str(tmp_path)])
    # SGR/SAF builds no projections either; the built-in student's recipe builds them projection_dim wide.
    with pytest.raises(ValueError, match=r"projection_dim=8 .* backbone='sgraf' keeps its own width"):
        parse_arguments(["--backbone", "sgraf", "--projection_dim", "8", "--output_dir", str(tmp_path)])
    (tmp_path / "narrow.yaml").write_text("backbone: sgraf\nprojection_dim: 8\n")  # from a config file too
    with pytest.raises(ValueError, match=r"projection_dim=8 .* backbone='sgraf' keeps its own width"):
        parse_arguments([str(tmp_path / "narrow.yaml"), "--output_dir", str(tmp_path)])
    (tmp_path / "default_width.yaml").write_text("backbone: sgraf\nprojection_dim: 256\n")  # as builtin_default.yaml
    assert parse_arguments([str(tmp_path / "default_width.yaml"), "--output_dir", str(tmp_path)])[0].backbone == "sgraf"
    model_args, _, _ = parse_arguments(["--projection_dim", "8", "--output_dir", str(tmp_path)])
    assert model_args.projection_dim == 8 and backbone_recipe(model_args.backbone).new_backbone(model_args).projection_dim == 8


def test_from_backbone_names_a_comparison_folder_and_an_unloadable_hub_id(tmp_path):
    for run in ("baseline", "cusa"):
        tiny_cusa_model(0).save_pretrained(tmp_path / "comparison" / run)
    with pytest.raises(ValueError, match=r"backbone='.*comparison' holds no model itself but 2 model folders "
                                         r"\(baseline, cusa\).*comparison/cusa'"):  # fmt: skip
        CusaModel.from_backbone(str(tmp_path / "comparison"))
    with pytest.raises(OSError, match=r"backbone='someone/no-such-model-xyz': no such local folder, and no Hub model"):
        CusaModel.from_backbone("someone/no-such-model-xyz")


def test_a_save_that_cannot_write_names_the_folder_and_the_cause(tmp_path, monkeypatch):
    import transformers.trainer

    from cusa_hf.checkpoints import SaveFailedError

    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    args = cusa_training_arguments(str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=1,
                                   save_strategy="steps", save_steps=1, per_device_train_batch_size=4)  # fmt: skip
    trainer = CusaTrainer(model=tiny_cusa_model(0, use_csa=False, use_usa=False), args=args, train_dataset=dataset,
                          processing_class=tiny_clip_processor())  # fmt: skip

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . basic_ios::clear: iostream error")

    monkeypatch.setattr(transformers.trainer.torch, "save", disk_full)
    with pytest.raises(SaveFailedError, match=r"could not save into .*run/checkpoint-1: .*basic_ios::clear: iostream "
                                              r"error; \d+ MiB free\)"):  # fmt: skip
        trainer.train()
    monkeypatch.undo()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    with pytest.raises(SaveFailedError, match=r"could not save into .*final: its disk is full \(OSError"):
        trainer.save_model(str(tmp_path / "final"))
