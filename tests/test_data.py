"""Tests of cusa_hf.data: JSON / Hub-style / imagefolder loading, record errors, and the evaluation view."""

import json
import os
from pathlib import Path

import datasets
import pytest
from PIL import Image

from cusa_hf.data import flatten_captions, load_imagefolder_dataset, load_json_dataset, load_retrieval_dataset
from cusa_hf.evaluation.eval_view import build_eval_view
from cusa_hf.schema import InvalidRecordError, normalize_image_ids

@pytest.fixture
def image_files(tmp_path):
    """Three small distinct images on disk."""
    paths = []
    for index, color in enumerate(["red", "green", "blue"]):
        path = tmp_path / "images" / f"img{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 6), color).save(path)
        paths.append(path)
    return paths


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_coco_mini_train_rows_keep_file_order_and_ids(coco_mini):
    folder = coco_mini
    records = json.loads((folder / "train.json").read_text())
    dataset = load_json_dataset(folder / "train.json")
    assert dataset.column_names == ["image", "caption", "image_id"]
    assert len(dataset) == len(records) == 3000
    assert dataset["caption"] == [record["caption"] for record in records]
    assert dataset["image_id"] == [record["image_id"] for record in records]
    first = dataset[0]["image"]
    assert os.path.isabs(first) and os.path.isfile(first)
    assert first == str(folder.resolve() / records[0]["image"])


def test_eval_records_with_caption_lists_become_one_row_per_caption(tmp_path, image_files):
    records = [
        {"image": "images/img0.png", "caption": ["a red square", "something red"]},
        {"image": "images/img1.png", "caption": ["a green square"]},
    ]
    dataset = load_json_dataset(write_json(tmp_path / "test.json", records))
    assert dataset["caption"] == ["a red square", "something red", "a green square"]
    # Without image_id the relative image path identifies the image.
    assert dataset["image_id"] == ["images/img0.png", "images/img0.png", "images/img1.png"]


def test_empty_caption_names_record_and_field(tmp_path, image_files):
    records = [
        {"image": "images/img0.png", "caption": "fine", "image_id": 1},
        {"image": "images/img1.png", "caption": "  ", "image_id": 2},
    ]
    with pytest.raises(InvalidRecordError, match=r"record 1: field 'caption' is empty"):
        load_json_dataset(write_json(tmp_path / "train.json", records))


def test_missing_image_names_record_and_field(tmp_path, image_files):
    records = [
        {"caption": "no image here", "image_id": 1},
        {"image": "images/absent.png", "caption": "a file that does not exist", "image_id": 2},
    ]
    path = write_json(tmp_path / "train.json", records)
    with pytest.raises(InvalidRecordError, match=r"record 0: field 'image' is missing"):
        load_json_dataset(path)
    with pytest.raises(InvalidRecordError, match=r"second.json record 0: field 'image' names a file that does not exist: .*absent.png"):
        load_json_dataset(write_json(tmp_path / "second.json", records[1:]))


def test_skip_invalid_reports_and_keeps_the_rest(tmp_path, image_files):
    records = [
        {"image": "images/img0.png", "caption": "first", "image_id": 1},
        {"image": "images/img1.png", "caption": "", "image_id": 2},
        {"image": "", "caption": "no image", "image_id": 3},
        {"image": "images/img2.png", "caption": ["last", ""], "image_id": 4},
    ]
    with pytest.warns(UserWarning, match=r"skipped 3 invalid record\(s\).*record 1.*record 2.*record 3: field 'caption\[1\]'"):
        dataset = load_json_dataset(write_json(tmp_path / "train.json", records), skip_invalid=True)
    assert dataset["caption"] == ["first", "last"]
    assert dataset["image_id"] == [1, 4]


def test_image_ids_get_one_storable_type():
    assert normalize_image_ids([3, 1, 3]) == [3, 1, 3]
    assert normalize_image_ids(["3", "coco_1"]) == ["3", "coco_1"]
    with pytest.raises(ValueError, match="boolean"):
        normalize_image_ids([True, 2])


def test_integer_and_string_image_ids_are_not_merged(tmp_path):
    # 1 and "1" are two different images in the file; one Arrow column would store them as one id.
    with pytest.raises(ValueError, match=r"image ids mix integers and strings \(row 0: 1, row 1: '1'\)"):
        normalize_image_ids([1, "1"])
    records = [{"image": "a.jpg", "caption": "first", "image_id": 1}, {"image": "b.jpg", "caption": "second", "image_id": "1"}]
    with pytest.raises(ValueError, match="mix integers and strings"):
        load_json_dataset(write_json(tmp_path / "train.json", records), check_files=False)


def test_image_ids_given_in_some_records_only_are_refused(tmp_path, image_files):
    # An eval file whose first record of each image carries an id and whose others do not: the fallback id (the
    # path) would count each image twice, halving its recall without a word.
    records = []
    for path in image_files:
        records.append({"image": str(path), "caption": ["a photo", "another photo"], "image_id": path.stem})
        records.append({"image": str(path), "caption": ["a third photo"]})
    with pytest.raises(InvalidRecordError, match=r"test.json: only some records carry 'image_id' \(record 0 has one, "
                                                 r"record 1 has none\)"):  # fmt: skip
        load_json_dataset(write_json(tmp_path / "test.json", records))
    # All given, or all derived from the paths: one id per image either way.
    for record in records:
        record.pop("image_id", None)
    assert len(set(load_json_dataset(write_json(tmp_path / "test.json", records))["image_id"])) == 3
    for record in records:
        record["image_id"] = Path(record["image"]).stem
    assert len(set(load_json_dataset(write_json(tmp_path / "test.json", records))["image_id"])) == 3


def test_flatten_captions_with_image_feature_and_id_column():
    images = [Image.new("RGB", (4, 4), color) for color in ("red", "blue")]
    source = datasets.Dataset.from_dict(
        {"img": images, "sentences": [["red one", "red two"], ["blue one"]], "img_id": [10, 20]},
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "sentences": datasets.List(datasets.Value("string")),
                "img_id": datasets.Value("int64"),
            }
        ),
    )
    flat = flatten_captions(source)
    assert flat.column_names == ["image", "caption", "image_id"]
    assert flat["caption"] == ["red one", "red two", "blue one"]
    assert flat["image_id"] == [10, 10, 20]
    assert isinstance(flat.features["image"], datasets.Image)
    assert flat[2]["image"].getpixel((0, 0)) == (0, 0, 255)


def test_flatten_captions_names_the_hub_row_of_an_empty_caption():
    source = datasets.Dataset.from_dict({"image": ["/x/a.jpg", "/x/b.jpg"], "caption": [["ok"], ["ok", ""]]})
    with pytest.raises(InvalidRecordError, match=r"row 1: field 'caption\[1\]' is empty"):
        flatten_captions(source, check_files=False, source="hub")


def test_imagefolder_with_metadata(tmp_path, image_files):
    folder = tmp_path / "images"
    lines = [
        {"file_name": "img0.png", "caption": ["red", "crimson"]},
        {"file_name": "img1.png", "caption": ["green"]},
        {"file_name": "img2.png", "caption": ["blue"]},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dataset = load_imagefolder_dataset(folder)
    assert sorted(dataset["caption"]) == ["blue", "crimson", "green", "red"]
    by_caption = dict(zip(dataset["caption"], dataset["image_id"]))
    assert by_caption["red"] == by_caption["crimson"] != by_caption["green"]
    assert by_caption["red"].endswith("img0.png")


def test_eval_view_from_caption_rows_and_from_caption_lists(tmp_path, image_files):
    per_caption = datasets.Dataset.from_dict(
        {
            "image": [str(image_files[0]), str(image_files[1]), str(image_files[0])],
            "caption": ["a", "b", "c"],
            "image_id": [7, 8, 7],
        }
    )
    view = build_eval_view(per_caption)
    assert view.image_ids == [7, 8]
    assert view.images == [str(image_files[0]), str(image_files[1])]
    assert view.text_to_image.tolist() == [0, 1, 0]
    assert view.image_to_texts == [[0, 2], [1]]

    per_image = datasets.Dataset.from_dict(
        {"image": [str(image_files[0]), str(image_files[1])], "caption": [["a", "c"], ["b"]], "image_id": [7, 8]}
    )
    grouped = build_eval_view(per_image)
    assert grouped.captions == ["a", "c", "b"]
    assert grouped.image_to_texts == [[0, 1], [2]]


def test_eval_view_rejects_an_id_with_two_images(image_files):
    rows = datasets.Dataset.from_dict(
        {"image": [str(image_files[0]), str(image_files[1])], "caption": ["a", "b"], "image_id": [1, 1]}
    )
    with pytest.raises(ValueError, match=r"image id 1 names two different images"):
        build_eval_view(rows)


def test_coco_mini_eval_view_uses_all_captions(coco_mini):
    folder = coco_mini
    view = build_eval_view(load_json_dataset(folder / "test.json"))
    assert (view.num_images, view.num_texts) == (201, 1000)
    assert sorted(index for texts in view.image_to_texts for index in texts) == list(range(1000))


def test_load_retrieval_dataset_dispatches_json_and_saved_folders(tmp_path, image_files):
    records = [{"image": "images/img0.png", "caption": "red", "image_id": 0}]
    from_json = load_retrieval_dataset(write_json(tmp_path / "train.json", records))
    from_json.save_to_disk(tmp_path / "saved")
    from_disk = load_retrieval_dataset(tmp_path / "saved")
    assert from_disk.to_dict() == from_json.to_dict()


def test_hold_out_images_keeps_every_caption_of_an_image_on_one_side():
    from cusa_hf.data import hold_out_images

    rows = [{"image_id": f"img{index % 4}", "caption": f"caption {index}"} for index in range(12)]
    rest, held_out = hold_out_images(datasets.Dataset.from_list(rows), 1)
    assert set(held_out["image_id"]) == {"img3"} and len(held_out) == 3
    assert "img3" not in rest["image_id"] and len(rest) == 9
    assert rest["caption"] == [row["caption"] for row in rows if row["image_id"] != "img3"]
    with pytest.raises(ValueError, match="num_images=4 held out leaves no training images"):
        hold_out_images(datasets.Dataset.from_list(rows), 4)


def test_skip_invalid_decodes_every_image_up_front_and_drops_the_truncated_one(tmp_path, image_files):
    truncated = tmp_path / "images" / "truncated.jpg"
    Image.new("RGB", (64, 64), "white").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    records = [
        {"image": "images/img0.png", "caption": "red", "image_id": 1},
        {"image": "images/truncated.jpg", "caption": "cut short", "image_id": 2},
        {"image": "images/truncated.jpg", "caption": "cut short again", "image_id": 2},
        {"image": "images/img1.png", "caption": "green", "image_id": 3},
    ]
    path = write_json(tmp_path / "train.json", records)
    # Without skipping, loading keeps the row (the file exists); training would fail when a batch reaches it.
    assert len(load_retrieval_dataset(path)) == 4
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) that do not decode.*truncated.jpg"):
        dataset = load_retrieval_dataset(path, skip_invalid=True)
    assert dataset["image_id"] == [1, 3] and dataset["caption"] == ["red", "green"]


def test_hub_datasets_may_not_point_outside_image_root(tmp_path, image_files):
    root = tmp_path / "images"
    rows = {"image": ["img0.png", "../secret.png"], "caption": ["red", "escape"], "image_id": [0, 1]}
    (tmp_path / "secret.png").write_bytes(image_files[1].read_bytes())
    with pytest.raises(InvalidRecordError, match=r"row 1: image '../secret.png' points outside image_root"):
        flatten_captions(datasets.Dataset.from_dict(rows), image_root=root, paths_within_root=True)
    absolute = {**rows, "image": ["img0.png", str(image_files[1])]}
    with pytest.raises(InvalidRecordError, match="points outside image_root"):
        flatten_captions(datasets.Dataset.from_dict(absolute), image_root=root, paths_within_root=True)
    # A user's own data may point anywhere (documented in docs/data_and_teachers.md).
    assert len(flatten_captions(datasets.Dataset.from_dict(rows), image_root=root)) == 2


def test_load_hub_dataset_confines_image_paths(tmp_path, image_files):
    from cusa_hf.data import load_hub_dataset

    data = tmp_path / "hub.jsonl"
    data.write_text(json.dumps({"image": "../../etc/passwd", "caption": "escape", "image_id": 1}) + "\n")
    with pytest.raises(InvalidRecordError, match=r"'../../etc/passwd' points outside image_root"):
        load_hub_dataset("json", data_files=str(data), image_root=tmp_path / "images")


def test_a_hub_image_column_cannot_read_local_files_outside_image_root(tmp_path, image_files):
    from cusa_hf.data import load_hub_dataset

    root = tmp_path / "images"
    secret = tmp_path / "secret.png"
    secret.write_bytes(image_files[1].read_bytes())
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "image_id": datasets.Value("int64")})  # fmt: skip

    def hub_parquet(images):
        rows = {"image": images, "caption": [f"caption {row}" for row in range(len(images))],
                "image_id": list(range(len(images)))}  # fmt: skip
        path = tmp_path / f"hub{len(images)}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
        return str(path)

    inside = {"path": str(image_files[0]), "bytes": None}
    for outside in (str(secret), f"file://{secret}", f"{root}/../secret.png"):
        data = hub_parquet([inside, {"path": outside, "bytes": None}])
        with pytest.raises(InvalidRecordError, match=r"row 1: image reads the local file .*secret.png.* outside image_root"):
            load_hub_dataset("parquet", data_files=data, image_root=root)
    # A file inside image_root, and image bytes carried by the dataset whatever path they name, load.
    embedded = {"path": "/nowhere/secret.png", "bytes": secret.read_bytes()}
    loaded = load_hub_dataset("parquet", data_files=hub_parquet([inside, embedded, inside]), image_root=root)
    assert len(loaded) == 3  # (an imagefolder reads the files of its own folder: test_imagefolder_with_metadata)


def test_a_caption_that_is_not_valid_unicode_names_file_record_and_field(tmp_path, image_files):
    path = tmp_path / "train.json"
    path.write_text('[{"image": "images/img0.png", "caption": "ok"}, {"image": "images/img1.png", "caption": "caf\\udcff"}]')
    with pytest.raises(InvalidRecordError, match=r"train.json record 1: field 'caption' is not valid Unicode text "
                                                  r"\(a lone surrogate '\\udcff' at character 3\)"):  # fmt: skip
        load_json_dataset(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid record"):
        assert load_json_dataset(path, skip_invalid=True)["caption"] == ["ok"]
