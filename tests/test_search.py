"""Tests of cusa_hf.search (RetrievalIndex) and the cusa-search CLI, on coco_mini's test split with a tiny random model.

The tiny model reads captions with the all-MiniLM-L6-v2 WordPiece tokenizer (the test extra installs it) rather than
tests/tiny_models.py's 60-word vocabulary, under which most COCO words are unknown and many captions tie exactly:
the index's top-k is compared with the evaluation code's, which needs scores without ties.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import coco_mini_path
from tiny_models import tiny_clip_config

pytest.importorskip("faiss")

from cusa_hf import CusaConfig, CusaModel  # noqa: E402
from cusa_hf.data import load_retrieval_dataset  # noqa: E402
from cusa_hf.evaluation.eval_view import build_eval_view  # noqa: E402
from cusa_hf.evaluation.encoding import encode_images, encode_texts, evaluate_retrieval  # noqa: E402
from cusa_hf.search import RetrievalIndex  # noqa: E402
from cusa_hf.search_cli import main as search_cli  # noqa: E402

KS = (1, 5, 10)


def tiny_wordpiece_model(seed: int = 0):
    """A tiny random CusaModel (CLIP backbone, 16-d embeddings) and its processor, reading MiniLM's WordPiece."""
    from transformers import AutoTokenizer, CLIPImageProcessor, VisionTextDualEncoderProcessor

    from cusa_hf.offline_models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), model_max_length=32)
    backbone = tiny_clip_config()
    backbone.text_config.vocab_size = tokenizer.vocab_size
    # CLIP pools the text at its EOS token: BERT's [SEP].
    backbone.text_config.eos_token_id = tokenizer.sep_token_id
    backbone.text_config.bos_token_id = tokenizer.cls_token_id
    backbone.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = CusaModel(CusaConfig(backbone_config=backbone)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def coco_test():
    folder = coco_mini_path()
    if folder is None:
        pytest.skip("coco_mini not found at ../shared/data/coco_mini; set CUSA_COCO_MINI to its folder to run this test")
    return load_retrieval_dataset(folder / "test.json")


@pytest.fixture(scope="module")
def tiny():
    return tiny_wordpiece_model(seed=0)


@pytest.fixture(scope="module")
def cross_index(tiny, coco_test):
    model, processor = tiny
    return RetrievalIndex.build(model, processor, images=coco_test, texts=coco_test, show_progress=False)


def top_k_from_scores(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n_queries, k)` values and indices of each row's k best entries."""
    top = scores.topk(k, dim=1)
    return top.values, top.indices


def hits_as_tensors(results) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.tensor([[hit["score"] for hit in hits] for hits in results])
    indices = torch.tensor([[hit["index"] for hit in hits] for hits in results])
    return scores, indices


def test_index_top_k_and_recall_equal_the_evaluation_code(tiny, coco_test, cross_index):
    """On coco_mini's 201 images x 1000 captions: the index's top-10 in both directions equals the top-10 of the
    evaluation code's similarity matrix, and R@1/5/10 counted from the index equal evaluate_retrieval's."""
    model, processor = tiny
    view = build_eval_view(coco_test)
    assert (len(cross_index.images), len(cross_index.texts)) == (201, 1000) == (len(view.images), len(view.captions))
    assert cross_index.images["image_id"] == view.image_ids

    metrics = evaluate_retrieval(model, processor, view, show_progress=False)
    image_features = encode_images(model, view.images, processor.image_processor, show_progress=False)
    text_features = encode_texts(model, view.captions, processor.tokenizer, show_progress=False)
    similarity = image_features @ text_features.T

    t2i = cross_index.search(texts=view.captions, k=10)
    i2t = cross_index.search(images=view.images, k=10)
    assert [len(hits) for hits in t2i] == [10] * 1000 and [len(hits) for hits in i2t] == [10] * 201
    for results, scores in ((t2i, similarity.T), (i2t, similarity)):
        index_scores, index_indices = hits_as_tensors(results)
        expected_scores, expected_indices = top_k_from_scores(scores, 10)
        torch.testing.assert_close(index_scores, expected_scores, atol=1e-5, rtol=0)
        assert torch.equal(index_indices, expected_indices)

    text_to_image = view.text_to_image.tolist()
    for k in KS:
        t2i_recall = sum(text_to_image[t] in [hit["index"] for hit in t2i[t][:k]] for t in range(1000)) / 10
        i2t_recall = 100 * sum(
            any(text_to_image[hit["index"]] == image for hit in i2t[image][:k]) for image in range(201)
        ) / 201
        assert t2i_recall == pytest.approx(metrics[f"t2i_r{k}"])
        assert i2t_recall == pytest.approx(metrics[f"i2t_r{k}"])
    # Each hit carries its row's ids: a caption hit names its own image.
    first = i2t[0][0]
    assert first["image_id"] == view.image_ids[text_to_image[first["index"]]]
    assert first["caption"] == view.captions[first["index"]]


def test_uni_head_searches_the_same_modality(tiny, coco_test):
    """With head="uni" image queries search images and caption queries captions, ranked by the USA heads."""
    model, processor = tiny
    few = coco_test.select(range(40))
    index = RetrievalIndex.build(model, processor, images=few, texts=few, head="uni", show_progress=False)
    images = build_eval_view(few).images
    image_hits = index.search(images=images, k=3)
    uni_images = encode_images(model, images, processor.image_processor, head="uni", show_progress=False)
    expected_scores, expected_indices = top_k_from_scores(uni_images @ uni_images.T, 3)
    scores, indices = hits_as_tensors(image_hits)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    assert indices[:, 0].tolist() == list(range(len(images)))  # every image finds itself first
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-5)
    text_hits = index.search(texts=few["caption"][:5], k=1)
    assert [hits[0]["caption"] for hits in text_hits] == few["caption"][:5]
    # The default direction is overridable: caption -> image in the uni space.
    assert "path" in index.search(texts="a man", target="images", k=1)[0][0]


def test_save_load_round_trip_and_refusals(tiny, coco_test, cross_index, tmp_path):
    model, processor = tiny
    cross_index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["head"] == "cross" and manifest["model"]["class"] == "CusaModel"
    assert manifest["collections"]["images"] == {"count": 201, "dim": 16, "dataset": "images",
                                                 "faiss_index": "images.faiss"}  # fmt: skip
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cross_index.save(tmp_path / "index")

    loaded = RetrievalIndex.load(tmp_path / "index", model=model, processor=processor)
    queries = ["a man riding a wave on a surfboard", "two dogs on a couch"]
    assert loaded.search(texts=queries, k=5) == cross_index.search(texts=queries, k=5)
    assert loaded.search(images=[coco_test[0]["image"]], k=5) == cross_index.search(images=[coco_test[0]["image"]], k=5)
    assert loaded.search(texts=queries, k=3, target="texts")[0][0]["caption"]  # text -> text works too

    other_model, _ = tiny_wordpiece_model(seed=1)
    with pytest.raises(ValueError, match="was built with CusaModel .*weights sha256.*query model is CusaModel"):
        RetrievalIndex.load(tmp_path / "index", model=other_model, processor=processor)
    with pytest.raises(ValueError, match="built with head 'cross'.*head='uni'"):
        RetrievalIndex.load(tmp_path / "index", model=model, processor=processor, head="uni")
    with pytest.raises(ValueError, match="records no checkpoint"):
        RetrievalIndex.load(tmp_path / "index").search(texts="a dog")


def test_collections_from_folders_and_lists_and_approximate_indexes(tiny, coco_test, tmp_path):
    model, processor = tiny
    paths = list(dict.fromkeys(coco_test["image"]))[:12]
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for position, path in enumerate(paths):
        shutil.copy(path, folder / ("nested" if position % 2 else "") / f"photo{position:02d}.jpg")
    (folder / "notes.txt").write_text("not an image")

    from_folder = RetrievalIndex.build(model, processor, images=folder, show_progress=False)
    assert len(from_folder.images) == 12 and from_folder.texts is None
    assert "nested/photo01.jpg" in from_folder.images["image_id"]
    best = from_folder.search(images=[folder / "photo00.jpg"], target="images", k=1)[0][0]
    assert (best["image_id"], best["score"]) == ("photo00.jpg", pytest.approx(1.0, abs=1e-5))
    with pytest.raises(ValueError, match="no texts collection"):
        from_folder.search(images=[folder / "photo00.jpg"])  # cross head: image -> captions, and there are none

    pil_images = [Image.open(path) for path in paths]
    from_list = RetrievalIndex.build(model, processor, images=pil_images, texts=["a dog", "a cat"],
                                     index_factory="HNSW8", search_parameters="efSearch=16", show_progress=False)  # fmt: skip
    assert from_list.images["image_id"] == [str(i) for i in range(12)] and from_list.images["path"] == [None] * 12
    exact = RetrievalIndex.build(model, processor, images=pil_images, show_progress=False)
    assert [h["index"] for h in from_list.search(texts="a dog", k=3)[0]] == [
        h["index"] for h in exact.search(texts="a dog", k=3)[0]
    ]
    with pytest.raises(ValueError, match="search_parameters='nprobe=4' do not apply"):
        RetrievalIndex.build(model, processor, texts=["a dog"], search_parameters="nprobe=4", show_progress=False)


def test_argument_errors(tiny, cross_index):
    model, processor = tiny
    with pytest.raises(ValueError, match="exactly one of texts= or images="):
        cross_index.search()
    with pytest.raises(ValueError, match="target='captions' is not supported"):
        cross_index.search(texts="a dog", target="captions")
    with pytest.raises(ValueError, match=r"texts\[1\] is ''"):
        cross_index.search(texts=["a dog", ""])
    with pytest.raises(ValueError, match="head='both' is not supported"):
        RetrievalIndex.build(model, processor, texts=["a dog"], head="both")
    with pytest.raises(ValueError, match="shape \\(n_queries, 16\\)"):
        cross_index.search_embeddings(torch.zeros(2, 8), target="images")


# ---------------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved_model(tiny, tmp_path_factory):
    model, processor = tiny
    folder = tmp_path_factory.mktemp("tiny-cusa")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_cli_builds_and_queries_end_to_end(saved_model, coco_test, tmp_path, capsys):
    """cusa-search build on a 7-image slice of coco_mini, then caption and image queries with PNG and HTML grids."""
    records = [{"image": row["image"], "caption": row["caption"], "image_id": row["image_id"]}
               for row in coco_test.select(range(30))]  # fmt: skip
    (tmp_path / "slice.json").write_text(json.dumps(records))
    assert search_cli(["build", "--model", str(saved_model), "--data", str(tmp_path / "slice.json"),
                       "--out", str(tmp_path / "index")]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["model"]["name_or_path"] == str(saved_model.resolve())
    assert {name: entry["count"] for name, entry in manifest["collections"].items()} == {"images": 7, "texts": 30}

    caption = records[0]["caption"]
    assert search_cli(["query", str(tmp_path / "index"), caption, "a dog catching a frisbee", "-k", "3",
                       "--image", records[0]["image"], "--save-grid", str(tmp_path / "grid.png"),
                       "--output-json", str(tmp_path / "hits.json")]) == 0  # fmt: skip
    answers = json.loads((tmp_path / "hits.json").read_text())
    assert [(a["kind"], a["target"], len(a["hits"])) for a in answers] == [
        ("text", "images", 3), ("text", "images", 3), ("image", "texts", 3)
    ]
    # The CLI's answers are the library's, on the model it recorded.
    model = CusaModel.from_pretrained(saved_model)
    index = RetrievalIndex.load(tmp_path / "index", model=model)
    library_hits = index.search(texts=caption, k=3)[0]
    assert [hit["index"] for hit in answers[0]["hits"]] == [hit["index"] for hit in library_hits]
    assert [hit["score"] for hit in answers[0]["hits"]] == pytest.approx([hit["score"] for hit in library_hits], abs=1e-6)
    out = capsys.readouterr().out
    assert f"text query {caption!r} -> images:" in out and f"{answers[0]['hits'][0]['score']:.4f}" in out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * 168, 3 * (168 + 18))  # query + 3 hits per row, one row per query

    assert search_cli(["query", str(tmp_path / "index"), "--image", records[0]["image"], "--target", "images",
                       "-k", "2", "--save-grid", str(tmp_path / "grid.html")]) == 0  # fmt: skip
    page = (tmp_path / "grid.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "1.000" in page  # the query image finds itself


def test_cli_indexes_a_plain_image_folder(saved_model, coco_test, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for position, path in enumerate(list(dict.fromkeys(coco_test["image"]))[:4]):
        shutil.copy(path, folder / f"p{position}.jpg")
    assert search_cli(["build", "--model", str(saved_model), "--data", str(folder), "--out", str(tmp_path / "idx"),
                       "--head", "uni"]) == 0  # fmt: skip
    assert search_cli(["query", str(tmp_path / "idx"), "--image", str(folder / "p2.jpg"), "-k", "1"]) == 0
    assert f"1  1.0000  {(folder / 'p2.jpg').resolve()}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        search_cli(["query", str(tmp_path / "idx")])


# ------------------------------------------------------------------------------------------------- damaged or odd input
@pytest.fixture(scope="module")
def small_saved_index(tiny, tmp_path_factory):
    """An index of three generated pictures and three captions, saved: ``(folder with the pictures, index folder)``."""
    model, processor = tiny
    folder = tmp_path_factory.mktemp("small_index")
    paths = []
    for color in ("red", "green", "blue"):
        Image.new("RGB", (40, 40), color).save(folder / f"{color}.png")
        paths.append(str(folder / f"{color}.png"))
    index = RetrievalIndex.build(model, processor, images=paths, texts=[f"a {c} square" for c in ("red", "green", "blue")],
                                 show_progress=False)  # fmt: skip
    index.save(folder / "index")
    return folder, folder / "index"


def damaged_copy(index_folder, tmp_path, edit):
    """A copy of the saved index with ``edit(copy)`` applied to it."""
    copy = tmp_path / "copy"
    shutil.copytree(index_folder, copy)
    edit(copy)
    return copy


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage,named",
    [
        (lambda copy: truncate(copy / "manifest.json"), "manifest.json"),
        (lambda copy: truncate(copy / "images.faiss"), "images.faiss"),
        (lambda copy: truncate(next((copy / "texts").glob("*.arrow"))), r"texts/data-00000-of-00001.arrow"),
        (lambda copy: (copy / "images.faiss").unlink(), "images.faiss"),
    ],
    ids=["manifest", "faiss", "arrow", "missing-faiss"],
)
def test_a_damaged_index_names_the_file_and_says_to_rebuild(tiny, small_saved_index, tmp_path, damage, named):
    model, processor = tiny
    copy = damaged_copy(small_saved_index[1], tmp_path, damage)
    with pytest.raises(ValueError, match=rf"{named}: the saved index is damaged .*Rebuild it"):
        RetrievalIndex.load(copy, model=model, processor=processor)


def test_manifest_paths_outside_the_index_folder_are_refused(tiny, small_saved_index, tmp_path):
    model, processor = tiny
    outside = tmp_path / "elsewhere.faiss"
    shutil.copy(small_saved_index[1] / "images.faiss", outside)

    def point_outside(copy):
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["collections"]["images"]["faiss_index"] = str(outside)
        manifest["collections"]["texts"]["dataset"] = "../texts"
        (copy / "manifest.json").write_text(json.dumps(manifest))

    copy = damaged_copy(small_saved_index[1], tmp_path, point_outside)
    with pytest.raises(ValueError, match=r"manifest.json: collection 'images' names .*elsewhere.faiss.*outside the "
                                         r"index folder"):  # fmt: skip
        RetrievalIndex.load(copy, model=model, processor=processor)


def test_k_must_be_a_whole_number_and_repeated_image_paths_are_indexed_once(tiny, small_saved_index):
    model, processor = tiny
    index = RetrievalIndex.load(small_saved_index[1], model=model, processor=processor)
    for k in (2.5, True, 0, "3"):
        with pytest.raises(ValueError, match=rf"k must be a positive whole number of results, got {k!r}"):
            index.search(texts="a red square", k=k)
    assert len(index.search(texts="a red square", k=np.int64(2))[0]) == 2
    red, green = (str(small_saved_index[0] / f"{color}.png") for color in ("red", "green"))
    with pytest.warns(UserWarning, match=r"images\[2\] '.*red.png' is images\[0\] again: it is indexed once"):
        twice = RetrievalIndex.build(model, processor, images=[red, green, red], show_progress=False)
    assert twice.images["path"] == [red, green]


def test_a_changed_processor_is_refused_like_changed_weights(tiny, saved_model, small_saved_index, tmp_path):
    import shutil as shell

    model, processor = tiny
    folder = tmp_path / "model"
    shell.copytree(saved_model, folder)
    index = RetrievalIndex.build(model, processor, texts=["a red square", "a dog"], show_progress=False)
    index.model_info["name_or_path"] = str(folder)  # as if built from the folder
    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["processor"]["image"]["do_normalize"] is True and manifest["processor"]["tokenizer_sha256"]
    hits = RetrievalIndex.load(tmp_path / "index").search(texts="a dog", target="texts", k=1)
    assert hits[0][0]["caption"] == "a dog"
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["do_normalize"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"another processor .*image processor do_normalize: index True, now False"):
        RetrievalIndex.load(tmp_path / "index").search(texts="a dog", target="texts", k=1)
    # The recorded model folder deleted: named, not tried as a Hub id.
    shell.rmtree(folder)
    with pytest.raises(FileNotFoundError, match=rf"the folder {folder} no longer exists"):
        RetrievalIndex.load(tmp_path / "index").search(texts="a dog", target="texts", k=1)


def test_cli_one_line_errors_and_no_index_among_the_users_data(saved_model, small_saved_index, tmp_path, capsys):
    pictures, index_folder = small_saved_index
    for argv, message in (
        (["query", str(index_folder), ""], r"cusa-search query: texts\[0\] is ''"),
        (["query", str(index_folder), "a dog", "-k", "0"], "cusa-search query: k must be a positive whole number"),
        (["build", "--model", str(saved_model), "--data", str(pictures), "--out", str(pictures)],
         "--out .* is, or lies inside, the --data folder"),
        (["build", "--model", str(saved_model), "--data", str(pictures), "--out", str(pictures / "index2")],
         "--out .* is, or lies inside, the --data folder"),
    ):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            search_cli(argv)
    assert not (pictures / "index2").exists() and not (pictures / "images").exists()
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.jpg").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds images, which no index wrote"):
        RetrievalIndex.load(index_folder, processor=None).save(mine)
    assert (mine / "images" / "holiday.jpg").read_text() == "mine"
