"""Streaming training: coco_mini written as WebDataset shards, read as a datasets stream with the teacher features
joined from the tables computed on a map-style pass, through CusaTrainer and examples/run_cusa.py."""

import json

import datasets
import numpy as np
import pytest
from test_run_cusa import run_cusa, tiny_backbone, tiny_run_args  # noqa: F401  (tiny_backbone is a fixture)

from cusa_hf.arguments import DataArguments
from cusa_hf.data import load_json_dataset, load_retrieval_dataset
from cusa_hf.streaming import load_training_stream, write_webdataset_shards
from cusa_hf.teachers.features import add_teacher_features
from cusa_hf.teachers.image_tables import image_feature_tables

TEACHERS = dict(image_teacher="offline:efficientnet-lite0", text_teacher="offline:all-MiniLM-L6-v2")


@pytest.fixture
def coco_shards(coco_mini, tmp_path):
    """The first 10 coco_mini training images (50 captions) as 3 shards, and 4 test images as JSON."""
    for split, count in (("train", 50), ("test", 20)):
        records = json.loads((coco_mini / f"{split}.json").read_text())[:count]
        for record in records:
            record["image"] = str(coco_mini / record["image"])
        (tmp_path / f"{split}.json").write_text(json.dumps(records))
    train = load_json_dataset(tmp_path / "train.json")
    shards = write_webdataset_shards(train, tmp_path / "shards", shard_size=20)
    assert [path.name for path in shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    return tmp_path, train


def test_the_stream_carries_the_features_of_the_map_style_pass(coco_shards):
    folder, train = coco_shards
    mapped = load_retrieval_dataset(str(folder / "shards"))  # the map-style pass over the same shards
    assert mapped["caption"] == train["caption"] and mapped["image_id"] == train["image_id"]
    assert isinstance(mapped.features["image"], datasets.Image)
    features = add_teacher_features(mapped, batch_size=16, cache_dir=folder / "cache", show_progress=False, **TEACHERS)
    data_args = DataArguments(train_file=str(folder / "shards"), streaming=True)
    stream = load_training_stream(data_args, features.select(range(40)), seed=0)  # 8 images: 2 are not trained on
    assert isinstance(stream, datasets.IterableDataset)
    table = image_feature_tables(features)["teacher_image_embeds"]
    row_of_id = {image_id: row for row, image_id in enumerate(table.table["image_id"])}
    text_of_caption = dict(zip(features["caption"], np.asarray(features["teacher_text_embeds"], dtype=np.float32)))
    rows = list(stream)
    assert sorted(row["caption"] for row in rows) == sorted(features["caption"][:40])
    for row in rows:
        np.testing.assert_array_equal(row["teacher_image_embeds"], table.take([row_of_id[row["image_id"]]])[0])
        np.testing.assert_array_equal(row["teacher_text_embeds"], text_of_caption[row["caption"]])
        assert row["image"].size[0] > 0  # decoded as it streams


def test_run_cusa_trains_from_shards_and_needs_max_steps(coco_shards, tiny_backbone, tmp_path):  # noqa: F811
    folder, _ = coco_shards
    settings = [
        "--train_file", str(folder / "shards"), "--streaming", "true", "--eval_strategy", "steps", "--eval_steps", "3",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--validation_images", "2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"stream \(IterableDataset\).*Set max_steps"):
        run_cusa.main(tiny_run_args(tiny_backbone, folder, tmp_path / "no-steps", *settings))
    results = run_cusa.main(tiny_run_args(tiny_backbone, folder, tmp_path / "run", *settings, "--max_steps", "6"))
    metrics = results["cusa"]
    assert 0 <= metrics["test_rsum"] <= 600 and "validation_rsum" in metrics
    assert (tmp_path / "run" / "model.safetensors").is_file() and "cusa-hf" in (tmp_path / "run" / "README.md").read_text()
    # The sigmoid term trains from the stream too (its positives by image id, as the stream's batches hold them).
    sigmoid = run_cusa.main(tiny_run_args(tiny_backbone, folder, tmp_path / "sigmoid", *settings, "--max_steps", "3",
                                          "--itc_loss", "sigmoid"))["cusa"]  # fmt: skip
    assert 0 <= sigmoid["test_rsum"] <= 600
    assert json.loads((tmp_path / "sigmoid" / "config.json").read_text())["itc_loss"] == "sigmoid"


# ------------------------------------------------------------------------------------------------------- damaged shards
def synthetic_shards(folder):
    """Eight rows (four images, two captions each) as two shards of four samples, keys 000000000 to 000000007."""
    from tiny_models import synthetic_dataset

    rows = synthetic_dataset(num_images=4, captions_per_image=2).select_columns(["image", "caption", "image_id"])
    write_webdataset_shards(rows, folder, shard_size=4)
    return folder


def rewrite_shard(shard, drop=None, image_id=None):
    """Write ``shard`` again without the member ``drop``, and with every sample's image id replaced by ``image_id``."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(member.name, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            if name == drop:
                continue
            if image_id is not None and name.endswith(".json"):
                data = json.dumps({"image_id": image_id}).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_cut_off_shard_is_named(tmp_path, streaming):
    from cusa_hf.streaming import load_webdataset_shards

    folder = synthetic_shards(tmp_path / "shards")
    shard = folder / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"shard-00001.tar: the shard is cut off .*sample '00000000\d'.*write it again"):
        load_webdataset_shards(folder, streaming=streaming)


@pytest.mark.parametrize("extension", ["txt", "jpg", "json"])
def test_a_sample_without_its_caption_image_or_id_is_named_with_shard_and_key(tmp_path, extension):
    from cusa_hf.streaming import load_webdataset_shards

    folder = synthetic_shards(tmp_path / "shards")
    rewrite_shard(folder / "shard-00001.tar", drop=f"000000005.{extension}")
    with pytest.raises(ValueError, match=rf"shard-00001.tar: sample '000000005' has no .{extension} file"):
        load_webdataset_shards(folder)


def test_integer_and_string_image_ids_across_shards_are_named(tmp_path):
    from cusa_hf.streaming import load_webdataset_shards

    folder = synthetic_shards(tmp_path / "shards")
    rewrite_shard(folder / "shard-00001.tar", image_id=7)
    with pytest.raises(ValueError, match=r"image ids mix strings and integers: shard-00000.tar sample '000000000' has "
                                         r"'img0', shard-00001.tar sample '000000004' has 7"):  # fmt: skip
        load_webdataset_shards(folder, streaming=True)
    rewrite_shard(folder / "shard-00001.tar", image_id="img7")
    assert len(load_webdataset_shards(folder)) == 8
