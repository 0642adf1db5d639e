"""Image features once per image (cusa_hf.teachers per-image tables): the same vectors reach the same batch rows as
the earlier one-copy-per-caption layout, the tables travel with saved folders, and the collator refuses rows whose
table it was not given."""

import shutil
import zlib

import datasets
import numpy as np
import pytest
import torch
from tiny_models import synthetic_dataset, tiny_clip_processor, tiny_cusa_model

from cusa_hf import CusaDataCollator, CusaTrainer, add_image_tower_features, cusa_training_arguments
from cusa_hf.evaluation.eval_view import build_eval_view
from cusa_hf.teachers.training_split import check_teacher_features
from cusa_hf.teachers.feature_cache import FeatureCacheOptions, FeatureSource, add_feature_columns
from cusa_hf.teachers.image_tables import image_feature_tables, save_with_feature_tables, with_image_features_in_rows
from cusa_hf.teachers.training_split import open_feature_split


def seeded_vectors(inputs, dim, salt):
    """A deterministic toy encoder: `(n, dim)` vectors seeded by each input's text or pixels."""
    rows = []
    for value in inputs:
        data = value.encode() if isinstance(value, str) else value.tobytes()
        generator = torch.Generator().manual_seed(zlib.crc32(data + salt.encode()))
        rows.append(torch.randn(dim, generator=generator))
    return torch.stack(rows)


def toy_sources():
    return [
        FeatureSource("image", lambda images: seeded_vectors(images, 12, "i"), "toy-image-1", "toy image teacher",
                      {"kind": "callable", "name_or_path": "toy-image"}),
        FeatureSource("text", lambda texts: seeded_vectors(texts, 8, "t"), "toy-text-1", "toy text teacher",
                      {"kind": "callable", "name_or_path": "toy-text"}),
    ]  # fmt: skip


@pytest.fixture
def with_tables(tmp_path):
    rows = synthetic_dataset(num_images=6, captions_per_image=3).remove_columns(
        ["teacher_image_embeds", "teacher_text_embeds"]
    )
    return add_feature_columns(rows, toy_sources(), options=FeatureCacheOptions(cache_dir=tmp_path / "cache",
                                                                               show_progress=False))  # fmt: skip


def test_image_features_are_stored_once_per_image_and_joined_as_batches_are_drawn(with_tables):
    table = image_feature_tables(with_tables)["teacher_image_embeds"]
    assert len(table.table) == 6 and len(with_tables) == 18
    assert "teacher_image_embeds" not in with_tables.column_names and table.index_column in with_tables.column_names
    assert table.table["image_id"] == list(dict.fromkeys(with_tables["image_id"]))
    in_rows = with_image_features_in_rows(with_tables)
    assert in_rows.features["teacher_image_embeds"] == datasets.List(datasets.Value("float32"), length=12)
    processor = tiny_clip_processor()
    rows = [with_tables[row] for row in (0, 4, 17)]
    # The collator turns rows into tensors; the split joins its rows to their images' features first.
    assert "teacher_image_embeds" not in CusaDataCollator(processor)(rows)
    joined = open_feature_split(with_tables).collate_with(CusaDataCollator(processor))(rows)
    expected = CusaDataCollator(processor)([in_rows[row] for row in (0, 4, 17)])
    assert torch.equal(joined["teacher_image_embeds"], expected["teacher_image_embeds"])
    assert not torch.equal(joined["teacher_image_embeds"][0], joined["teacher_image_embeds"][1])  # other images


def train_losses(dataset, output_dir):
    args = cusa_training_arguments(
        str(output_dir), learning_rate=5e-3, max_steps=4, per_device_train_batch_size=6, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
    )  # fmt: skip
    trainer = CusaTrainer(model=tiny_cusa_model(0), args=args, train_dataset=dataset, processing_class=tiny_clip_processor())
    trainer.train()
    return [(entry["loss"], entry["loss_csa"], entry["loss_usa"]) for entry in trainer.state.log_history if "loss" in entry]


def test_per_image_tables_and_per_row_columns_train_the_same(with_tables, tmp_path):
    per_image = train_losses(with_tables, tmp_path / "a")
    per_row = train_losses(with_image_features_in_rows(with_tables), tmp_path / "b")  # the layout before the tables
    assert per_image == per_row and len(per_image) == 4 and all(csa > 0 for _, csa, _ in per_image)


def test_tables_travel_with_save_with_feature_tables_and_their_absence_is_explained(with_tables, tmp_path):
    expected = check_teacher_features(with_tables)
    save_with_feature_tables(with_tables, tmp_path / "complete")
    with_tables.save_to_disk(tmp_path / "rows_only")
    shutil.rmtree(tmp_path / "cache")  # another machine: only the saved folders
    assert check_teacher_features(datasets.load_from_disk(tmp_path / "complete")) == expected
    with pytest.raises(FileNotFoundError, match="per-image table of column 'teacher_image_embeds'.*save_with_feature_tables"):
        check_teacher_features(datasets.load_from_disk(tmp_path / "rows_only"))


def test_a_frozen_image_tower_table_gives_the_same_evaluation_view(tmp_path):
    processor = tiny_clip_processor()
    model = tiny_cusa_model(0)
    model.adapter.image_tower().requires_grad_(False)
    dataset = synthetic_dataset(num_images=4, captions_per_image=2)
    options = dict(show_progress=False, cache_dir=tmp_path)
    in_rows = add_image_tower_features(dataset, model, processor.image_processor, **options)
    in_table = add_image_tower_features(dataset, model, processor.image_processor, image_table=True, **options)
    assert "image_tower_features" in in_rows.column_names and "image_tower_features_index" in in_table.column_names
    assert len(image_feature_tables(in_table)["image_tower_features"].table) == 4
    np.testing.assert_array_equal(build_eval_view(in_table).image_tower_features, build_eval_view(in_rows).image_tower_features)


@pytest.mark.parametrize("which", ["rows", "images"])
def test_a_cut_off_cache_file_is_named_and_computed_again(tmp_path, which):
    rows = synthetic_dataset(num_images=6, captions_per_image=3).remove_columns(
        ["teacher_image_embeds", "teacher_text_embeds"]
    )
    calls = []

    def counted(sources):
        return [FeatureSource(s.modality, lambda x, s=s: calls.append(s.modality) or s.encode(x), s.fingerprint, s.label,
                              s.description) for s in sources]  # fmt: skip

    options = FeatureCacheOptions(cache_dir=tmp_path / "cache", show_progress=False)
    first = add_feature_columns(rows, counted(toy_sources()), options=options)
    expected_text = np.asarray(first["teacher_text_embeds"])
    expected_images = image_feature_tables(first)["teacher_image_embeds"].take(list(range(6)))
    row_file = next(path for path in (tmp_path / "cache").glob("cusa-teachers-*.arrow") if "-images" not in path.name)
    damaged = row_file if which == "rows" else row_file.with_name(f"{row_file.stem}-images.arrow")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    calls.clear()
    with pytest.warns(UserWarning, match=rf"{damaged}: the feature cache file is damaged .*; computing the features again"):
        again = add_feature_columns(rows, counted(toy_sources()), options=options)
    assert set(calls) == {"image", "text"}
    np.testing.assert_array_equal(np.asarray(again["teacher_text_embeds"]), expected_text)
    np.testing.assert_array_equal(image_feature_tables(again)["teacher_image_embeds"].take(list(range(6))), expected_images)
    calls.clear()
    add_feature_columns(rows, counted(toy_sources()), options=options)  # repaired: read from the cache again
    assert calls == []
