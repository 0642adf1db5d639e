"""examples/evaluate_cusa.py on a tiny saved CusaModel: table, JSON, PNG and HTML top-5 pictures, uni-modal extras."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


def load_example():
    spec = importlib.util.spec_from_file_location("evaluate_cusa", REPO_ROOT / "examples" / "evaluate_cusa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    from tiny_models import synthetic_pairs, tiny_clip_processor, tiny_cusa_model

    folder = tmp_path_factory.mktemp("eval_example")
    tiny_cusa_model().save_pretrained(folder / "model")
    tiny_clip_processor().save_pretrained(folder / "model")
    records = []
    for index, row in enumerate(synthetic_pairs(num_images=7, captions_per_image=2)):
        name = f"{row['image_id']}.png"
        row["image"].save(folder / name)
        records.append({"image": name, "caption": row["caption"], "image_id": row["image_id"]})
    (folder / "test.json").write_text(json.dumps(records))
    return folder


@pytest.mark.parametrize("picture", ["top5.png", "top5.html"])
def test_example_writes_table_json_and_picture(checkpoint_and_data, picture, capsys):
    folder = checkpoint_and_data
    example = load_example()
    result = example.main([
        "--model", str(folder / "model"), "--data", str(folder / "test.json"), "--device", "cpu", "--quiet",
        "--max-images", "5", "--output-json", str(folder / "metrics.json"), "--save-grid", str(folder / picture),
        "--grid-captions", "3",
        "--sts", str(FIXTURES / "sts_tiny.csv"), "--labelled-images", str(FIXTURES / "labelled_images"),
    ])
    printed = capsys.readouterr().out
    assert "5 images x 10 captions" in printed and "rsum" in printed
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["metrics"] == result["metrics"]
    assert set(saved["metrics"]) >= {"i2t_r1", "t2i_r10", "rsum", "sts_spearman", "image_r1"}
    # The uni-modal extras are the evaluators' numbers with the USA heads, as during training.
    from transformers import AutoProcessor

    from cusa_hf import CusaModel
    from cusa_hf.evaluation.encoding import evaluate_image_retrieval, evaluate_sts
    from cusa_hf.evaluation.loaders import load_labelled_images, load_sts

    model, processor = CusaModel.from_pretrained(folder / "model").eval(), AutoProcessor.from_pretrained(folder / "model")
    sts = evaluate_sts(model, processor.tokenizer, load_sts(str(FIXTURES / "sts_tiny.csv")), head="uni", show_progress=False)
    images = load_labelled_images(str(FIXTURES / "labelled_images"))
    image_r1 = evaluate_image_retrieval(model, processor.image_processor, images, head="uni", show_progress=False)
    assert saved["metrics"]["sts_spearman"] == pytest.approx(sts) and saved["metrics"]["image_r1"] == pytest.approx(image_r1)
    if picture.endswith(".png"):
        with Image.open(folder / picture) as grid:
            assert grid.size == (5 * 168, 3 * (168 + 28))
    else:
        page = (folder / picture).read_text()
        assert page.count("<img") == 15 and page.count("<th") == 3


def test_missing_model_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = load_example()
    data = ["--data", str(tmp_path / "test.json"), "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match=r"--model .*missing: no such folder \(and not the form of a Hub model id\)"):
        example.main(["--model", str(tmp_path / "missing"), *data])
    # A relative path has the form of a Hub id: offline, there is nothing to load it from either.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--model outputs/missing: no such folder, and no Hub model of that id"):
        example.main(["--model", "outputs/missing", *data])


def test_checkpoint_without_image_processor_is_described(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "bert"
    folder.mkdir()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]))
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(folder)
    example = load_example()
    with pytest.raises(ValueError, match=r"holds a 'bert' checkpoint and its processor loads as a Bert\w*Tokenizer\w*, "
                                         r"not a processor with both .* expects a CUSA, CLIP or other dual-encoder"):
        example.main(["--model", str(folder), "--data", str(tmp_path / "test.json"), "--device", "cpu"])


def test_the_uni_head_of_a_model_without_usa_heads_comes_with_a_notice(checkpoint_and_data, tmp_path, capsys):
    from tiny_models import tiny_clip_processor, tiny_cusa_model

    folder = checkpoint_and_data
    tiny_cusa_model(use_usa=False).save_pretrained(tmp_path / "baseline")
    tiny_clip_processor().save_pretrained(tmp_path / "baseline")
    data = ["--data", str(folder / "test.json"), "--device", "cpu", "--quiet"]
    result = load_example().main(["--model", str(tmp_path / "baseline"), "--head", "uni", *data])
    notice = "has no USA heads (use_usa=False), so its 'uni' embeddings are the backbone's own normalised features"
    assert notice in capsys.readouterr().out and notice in result["notes"][0]
    # The cross head of the same model, and the uni head of a model with USA heads, need no notice.
    for argv in (["--model", str(tmp_path / "baseline")], ["--model", str(folder / "model"), "--head", "uni"]):
        notes = load_example().main([*argv, *data])["notes"]
        assert [note for note in notes if not note.startswith("only 7 image(s)")] == []  # (7 images: R@10 is trivial)


def test_a_comparison_folder_a_missing_image_and_a_tiny_test_set_are_named(checkpoint_and_data, tmp_path, capsys):
    import shutil

    folder = checkpoint_and_data
    example = load_example()
    comparison = tmp_path / "comparison"
    for run in ("baseline", "cusa"):
        shutil.copytree(folder / "model", comparison / run)
    data = ["--data", str(folder / "test.json"), "--device", "cpu", "--quiet"]
    with pytest.raises(ValueError, match=r"--model='.*comparison' holds no model itself but 2 model folders "
                                         r"\(baseline, cusa\)"):  # fmt: skip
        example.main(["--model", str(comparison), *data])
    records = json.loads((folder / "test.json").read_text())
    records[1]["image"] = "gone.png"
    (tmp_path / "test.json").write_text(json.dumps(records))
    for record in records:
        shutil.copy(folder / record["image"], tmp_path) if (folder / record["image"]).exists() else None
    missing = ["--model", str(folder / "model"), "--data", str(tmp_path / "test.json"), "--device", "cpu", "--quiet"]
    with pytest.raises(ValueError, match=r"gone.png.*here that is --skip-invalid"):
        example.main(missing)
    result = example.main([*missing, "--skip-invalid", "--max-images", "1"])
    assert result["metrics"]["rsum"] == 600 and any("only 1 image(s)" in note for note in result["notes"])
    assert "note: only 1 image(s): text->image R@K with K >= 1 is 100" in capsys.readouterr().out
