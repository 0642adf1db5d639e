"""examples/run_cusa.py with SGR/SAF backbones: the sgr_*/saf_* configs, and a tiny run on SCAN-format features."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import get_scheduler

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import run_cusa  # noqa: E402

from cusa_hf import CusaModel  # noqa: E402
from cusa_hf.arguments import parse_arguments  # noqa: E402
from cusa_hf.offline_models import BUILTIN_BACKBONE  # noqa: E402
from cusa_hf.backbone_recipes import backbone_recipe  # noqa: E402
from cusa_hf.factory import build_model  # noqa: E402
from cusa_hf.models.sgraf.recipe import SgrafRecipe, fresh_model_fields  # noqa: E402
from cusa_hf.models.sgraf.configuration_sgraf import SgrafConfig  # noqa: E402
from cusa_hf.models.sgraf.modeling_sgraf import SgrafModel  # noqa: E402
from cusa_hf.models.sgraf.tokenization_sgraf import SgrafTokenizer  # noqa: E402
from cusa_hf.models.sgraf.evaluation import PROTOCOLS, evaluate_sgraf  # noqa: E402
from cusa_hf.models.sgraf.features import RegionFeatureSplit  # noqa: E402

SGRAF_CONFIGS = sorted((REPO / "examples" / "configs").glob("s[ga][rf]_*.yaml"))
WORDS = ["a", "dog", "cat", "red", "blue", "bus", "runs", "sits", "on", "the", "grass", "street"]
REGIONS, FEATURE_DIM = 4, 12


def write_split(folder: Path, split: str, n_images: int, seed: int, with_images: bool = True) -> RegionFeatureSplit:
    """A SCAN-format split of random region features, 5 captions per image, ids naming small PNGs in folder/images."""
    rng = np.random.default_rng(seed)
    image_ids = [f"{split}_{index}.png" for index in range(n_images)]
    captions = [" ".join(rng.choice(WORDS, size=6)) for _ in range(5 * n_images)]
    region_split = RegionFeatureSplit(
        features=rng.normal(size=(n_images, REGIONS, FEATURE_DIM)).astype(np.float32),
        captions=captions,
        text_to_image=torch.arange(5 * n_images) // 5,
        image_ids=image_ids,
    )
    region_split.save(folder, split)
    if with_images:
        (folder / "images").mkdir(exist_ok=True)
        for image_id in image_ids:
            colour = tuple(int(value) for value in rng.integers(0, 256, size=3))
            Image.new("RGB", (32, 32), colour).save(folder / "images" / image_id)
    return RegionFeatureSplit.load(folder, split)


@pytest.fixture(scope="module")
def scan_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scan")
    write_split(folder, "train", n_images=12, seed=0)
    write_split(folder, "test", n_images=10, seed=1)
    return folder


def sgraf_run_args(data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--backbone", "sgraf",
        "--sgraf_module_name", "SGR",
        "--sgraf_img_dim", str(FEATURE_DIM),
        "--sgraf_embed_size", "16",
        "--sgraf_word_dim", "8",
        "--sgraf_sim_dim", "8",
        "--features_dir", str(data),
        "--test_split", "test",
        "--eval_protocol", "coco1k",
        "--validation_images", "2",
        "--image_root", str(data / "images"),
        "--image_teacher", "offline:efficientnet-lite0",
        "--text_teacher", "offline:all-MiniLM-L6-v2",
        "--teacher_cache_dir", str(output_dir.parent / "teacher_cache"),
        "--csa_weight", "0.6",
        "--usa_weight", "0.75",
        "--output_dir", str(output_dir),
        "--num_train_epochs", "2",
        "--per_device_train_batch_size", "10",
        "--learning_rate", "0.002",
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch",
        "--load_best_model_at_end", "true",
        "--metric_for_best_model", "rsum",
        "--report_to", "none",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("config", SGRAF_CONFIGS, ids=lambda path: path.stem)
def test_sgraf_configs_parse_and_their_schedules_build(config, tmp_path):
    vocab = tmp_path / "vocab.json"
    SgrafTokenizer.from_captions(["a dog"] * 4, tmp_path)
    model_args, data_args, training_args = parse_arguments(
        [str(config), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--features_dir", str(tmp_path),
         "--sgraf_vocab_file", str(vocab)]
    )  # fmt: skip
    module, dataset, recipe = config.stem.split("_", 2)
    assert model_args.backbone == "sgraf" and model_args.sgraf_module_name == module.upper()
    assert isinstance(backbone_recipe(model_args.backbone), SgrafRecipe)
    assert data_args.eval_protocol in PROTOCOLS and data_args.features_dir == str(tmp_path)
    assert training_args.cusa == (recipe != "original")
    assert training_args.metric_for_best_model == "rsum" and training_args.max_grad_norm == 2.0
    if recipe != "mini_grid":
        assert data_args.validation_split == "dev" and training_args.per_device_train_batch_size == 128
    if training_args.cusa:
        assert training_args.csa_weight == (0.6 if module == "sgr" else 1.0) and training_args.usa_weight == 0.75
    assert SgrafConfig(**fresh_model_fields(model_args)).module_name == module.upper()

    # The schedule Trainer would build: the original recipes' x0.1 step right after num_stable_steps.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training_args.learning_rate)
    total = 50_000
    scheduler = get_scheduler(
        training_args.lr_scheduler_type, optimizer, num_warmup_steps=training_args.get_warmup_steps(total),
        num_training_steps=total, scheduler_specific_kwargs=training_args.lr_scheduler_kwargs,
    )  # fmt: skip
    # A LambdaLR's rate after ``step`` scheduler steps is the base rate times its lambda at ``step``: read so rather
    # than stepping the optimiser 50,000 times per config.
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    learning_rates = [training_args.learning_rate * scheduler.lr_lambdas[0](step) for step in range(total)]
    assert learning_rates[0] == pytest.approx(training_args.learning_rate)
    if recipe == "original":
        stable = training_args.lr_scheduler_kwargs["num_stable_steps"]
        assert learning_rates[stable - 1] == pytest.approx(training_args.learning_rate)
        assert learning_rates[stable + 1] == pytest.approx(0.1 * training_args.learning_rate)
        assert learning_rates[-1] == pytest.approx(0.1 * training_args.learning_rate)
    else:
        assert learning_rates[-1] == pytest.approx(training_args.lr_scheduler_kwargs["min_lr"], rel=1e-3)


def test_sgr_trains_compares_with_baseline_saves_and_reloads(scan_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    results = run_cusa.main(sgraf_run_args(scan_data, output_dir, "--compare_with_baseline", "true"))
    assert set(results) == {"baseline", "cusa"}
    vocab = json.loads((output_dir / "vocab.json").read_text())["word2idx"]
    assert set(vocab) == {"<pad>", "<start>", "<end>", "<unk>", *WORDS}  # built from the train captions
    test = RegionFeatureSplit.load(scan_data, "test")
    for run in ("baseline", "cusa"):
        metrics, folder = results[run], output_dir / run
        assert 0 <= metrics["validation_rsum"] <= 600 and 0 <= metrics["test_rsum"] <= 600
        card = (folder / "README.md").read_text()
        assert f"{metrics['test_rsum']:.2f}" in card and "csa_weight" in card and "SCAN-format" in card
        model = CusaModel.from_pretrained(folder)
        assert model.config.use_csa == (run == "cusa") and isinstance(model.backbone, SgrafModel)
        assert model.config.backbone_config.img_dim == FEATURE_DIM and model.config.backbone_config.num_regions == REGIONS
        tokenizer = SgrafTokenizer.from_pretrained(folder)  # the saved processor is the run's tokenizer
        assert tokenizer.get_vocab() == vocab
        # The saved model is the one tested: re-scoring the test split under coco1k gives the reported numbers.
        again = evaluate_sgraf(model.backbone, test.features, test.captions, test.text_to_image, tokenizer, "coco1k")
        assert again["rsum"] == pytest.approx(metrics["test_rsum"], abs=1e-4)
    cusa_config = CusaModel.from_pretrained(output_dir / "cusa").config
    assert cusa_config.teacher_image_dim == 1280 and cusa_config.teacher_text_dim == 384
    assert json.loads((output_dir / "results.json").read_text()) == results
    printed = capsys.readouterr().out
    assert "baseline" in printed and "cusa" in printed and "rsum" in printed


def test_validation_split_files_and_saved_folders(scan_data, tmp_path):
    """A dev split on disk is the validation set (scored with its own features); a saved SGR folder is a backbone."""
    data = tmp_path / "data"
    for split in ("train", "test"):
        for path in scan_data.glob(f"{split}_*"):
            (data / path.name).parent.mkdir(exist_ok=True)
            (data / path.name).write_bytes(path.read_bytes())
    dev = write_split(data, "dev", n_images=3, seed=5, with_images=False)
    tokenizer = SgrafTokenizer.from_captions(RegionFeatureSplit.load(data, "train").captions, tmp_path / "vocab")
    torch.manual_seed(0)
    saved = SgrafModel(SgrafConfig(vocab_size=tokenizer.vocab_size, img_dim=FEATURE_DIM, num_regions=REGIONS,
                                   embed_size=16, word_dim=8, sim_dim=8, module_name="SAF"))  # fmt: skip
    saved.save_pretrained(tmp_path / "saf")
    tokenizer.save_pretrained(tmp_path / "saf")

    args = parse_arguments(["--backbone", str(tmp_path / "saf"), "--features_dir", str(data), "--validation_split",
                                     "dev", "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--cusa", "false"])  # fmt: skip
    model_args, data_args, training_args = args
    recipe = backbone_recipe(model_args.backbone)
    assert isinstance(recipe, SgrafRecipe)
    run_data = recipe.load_run_data(model_args, data_args, training_args)
    splits = run_data.splits
    assert len(splits["validation"]) == 15 and len(splits["train"]) == 60
    assert run_data.new_backbone() == str(tmp_path / "saf")  # a saved model is loaded, not built fresh
    model = build_model(model_args, run_data, use_csa=False, use_usa=False)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    scorer = run_data.evaluator_settings["pairwise_scorer"](model, dev.eval_view())
    assert scorer.num_images == 3 and scorer.num_texts == 15
    expected = evaluate_sgraf(saved, dev.features, dev.captions, dev.text_to_image, tokenizer, "f30k")
    from cusa_hf.evaluation.metrics import retrieval_metrics

    assert retrieval_metrics(scorer.similarity(), dev.text_to_image)["rsum"] == pytest.approx(expected["rsum"])


def test_bad_sgraf_input_stops_before_training(scan_data, tmp_path):
    attempts = iter(range(100))

    def run(*extra):  # each attempt in a fresh folder: an earlier attempt may have written its vocabulary
        return run_cusa.main(sgraf_run_args(scan_data, tmp_path / f"out{next(attempts)}", *extra))

    with pytest.raises(ValueError, match="set features_dir"):
        run_cusa.main([arg for arg in sgraf_run_args(scan_data, tmp_path / "out") if arg not in ("--features_dir", str(scan_data))])
    with pytest.raises(ValueError, match=r"\(4, 12\) \(regions, dim\) per image but the model takes \(4, 2048\)"):
        run("--sgraf_img_dim", "2048")
    with pytest.raises(ValueError, match="module_name='SGRAF'"):
        run("--sgraf_module_name", "SGRAF")
    with pytest.raises(ValueError, match="needs the test images in 5 equal folds, but .* has 7"):
        write_split(tmp_path / "odd", "train", 4, seed=2, with_images=False)
        write_split(tmp_path / "odd", "test", 7, seed=3, with_images=False)
        run("--features_dir", str(tmp_path / "odd"))
    with pytest.raises(FileNotFoundError, match=r"10 of 10 images named by .*train_image_ids.txt are not under"):
        run("--image_root", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vocab_file='.*missing.json' does not exist"):
        run("--sgraf_vocab_file", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="eval_protocol='coco'"):
        run("--eval_protocol", "coco")
    with pytest.raises(ValueError, match="features_dir is for backbones that read region features"):
        run("--backbone", BUILTIN_BACKBONE)
