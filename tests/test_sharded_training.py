"""Sharded training through accelerate: FSDP2 (examples/configs/accelerate_fsdp.yaml) and DeepSpeed ZeRO-2
(examples/configs/accelerate_deepspeed_zero2.yaml + deepspeed_zero2.json).

accelerate 1.15 enables FSDP only on accelerator devices: with ``use_cpu`` its ``AcceleratorState`` keeps
``DistributedType.MULTI_CPU`` and drops the FSDP plugin, so ``accelerate launch --config_file accelerate_fsdp.yaml``
on a CPU machine silently trains with DDP. The CPU test below lifts that one gate in the launched script (nothing
else is patched: accelerate wraps the model with ``fully_shard``, the Trainer gathers the full state dict on rank 0
and saves it) and runs examples/run_cusa.py in two gloo processes. ``test_fsdp_on_gpus`` runs the same unpatched
on GPUs (benchmarks/fsdp_gpu_check.sh) and skips without them.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from test_run_cusa import run_cusa, shapes, tiny_backbone, tiny_run_args  # noqa: F401  (fixtures)
from two_process import free_port

from cusa_hf import CusaModel

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "examples" / "configs"

# Written into each test's folder and launched instead of run_cusa.py: records save_model and every Hub call per rank
# (the Hub mocked at HfApi's HTTP calls, as tests/test_hub_push.py does) and, when asked, lets accelerate keep FSDP on
# CPU processes.
LAUNCHED = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {examples!r})
    import huggingface_hub.hf_api, yaml
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    calls = os.path.join(os.environ["CUSA_TEST_CALLS"], "rank%s.json" % os.environ.get("RANK", "0"))
    def record(entry):
        entries = json.load(open(calls)) if os.path.exists(calls) else []
        json.dump(entries + [entry], open(calls, "w"))
    def create_repo(self, repo_id, **kwargs):
        record({{"call": "create_repo", "repo_id": repo_id}})
        return RepoUrl("https://huggingface.co/" + repo_id)
    def create_commit(self, repo_id, operations, **kwargs):
        record({{"call": "create_commit", "repo_id": repo_id, "files": sorted(op.path_in_repo for op in operations)}})
        return CommitInfo(commit_url="https://huggingface.co/%s/commit/%s" % (repo_id, "0" * 40), commit_message="",
                          commit_description="", oid="0" * 40)
    def validate_yaml(self, content, **kwargs):  # POST /api/validate-yaml: the Hub refuses metadata that won't parse
        record({{"call": "validate_yaml"}})
        yaml.safe_load(content.split("---")[1])
    HfApi.create_repo, HfApi.create_commit, HfApi._validate_yaml = create_repo, create_commit, validate_yaml
    # With hf_xet installed, upload_folder streams through xet instead of one create_commit (tests/test_hub_push.py)
    huggingface_hub.hf_api.is_xet_available = lambda: False

    if os.environ.get("CUSA_TEST_FSDP_ON_CPU") == "1":
        import accelerate.state
        from accelerate.utils import DistributedType
        original_init = accelerate.state.AcceleratorState.__init__
        def init(self, *args, fsdp_plugin=None, **kwargs):
            original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
                accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerate.state.AcceleratorState.__init__ = init

    from cusa_hf.trainer import CusaTrainer
    original_save_model = CusaTrainer.save_model
    def save_model(self, *args, **kwargs):  # under FSDP every rank must join: the full state dict is gathered
        record({{"call": "save_model"}})
        return original_save_model(self, *args, **kwargs)
    CusaTrainer.save_model = save_model
    original_train = CusaTrainer.train
    def train(self, *args, **kwargs):
        output = original_train(self, *args, **kwargs)
        print("trained with fsdp=%s as %s" % (self.is_fsdp_enabled, type(self.model_wrapped).__name__), flush=True)
        return output
    CusaTrainer.train = train

    import run_cusa
    run_cusa.main()
    """
)

COMMON = ["--gather_features", "true", "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no",
          "--load_best_model_at_end", "false", "--logging_steps", "1", "--dataloader_drop_last", "true"]  # fmt: skip
PUSH = ["--push_to_hub", "true", "--hub_model_id", "someone/tiny-cusa-fsdp", "--hub_token", "dummy"]


def fsdp_cpu_config(tmp_path) -> Path:
    """examples/configs/accelerate_fsdp.yaml for CPU processes (fp32: bf16 autocast is for the GPUs)."""
    config = yaml.safe_load((CONFIGS / "accelerate_fsdp.yaml").read_text())
    config.update(use_cpu=True, mixed_precision="no")
    config_file = tmp_path / "accelerate_fsdp_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return config_file


def accelerate_launch(tmp_path, config_file, backbone, data, num_processes, *extra, cpu, per_device_batch,
                      name="sharded", succeed=True):  # fmt: skip
    """``accelerate launch --config_file ... run_cusa.py COMMON + extra`` with the Hub mocked; returns the output
    folder ``tmp_path / name`` and the log. Each rank's calls are recorded in ``tmp_path / f"calls_{name}"``.
    ``succeed=False``: the run must fail instead."""
    script = tmp_path / "launched_run_cusa.py"
    script.write_text(LAUNCHED.format(examples=str(REPO / "examples")))
    (tmp_path / f"calls_{name}").mkdir()
    output = tmp_path / name
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--num_processes", str(num_processes), "--main_process_port", str(free_port()), str(script),
               *tiny_run_args(backbone, data, output, *COMMON, "--per_device_train_batch_size", str(per_device_batch),
                              "--teacher_cache_dir", str(tmp_path / f"cache_{name}"), "--use_cpu", str(cpu).lower(),
                              *extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUSA_TEST_CALLS": str(tmp_path / f"calls_{name}"),
           "CUSA_TEST_FSDP_ON_CPU": "1" if cpu else "0"}  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    assert (result.returncode == 0) == succeed, "\n".join(errors[-20:]) + result.stderr[-3000:]
    return output, result.stdout + result.stderr


def check_like_one_process(tmp_path, backbone, data, output, num_processes, log, *extra):
    """Weights and metrics of the sharded run equal one process on the same global batches (``extra``: the sharded
    run's further flags); the sharded run trained (the loss was logged from every step), only rank 0 uploaded, and
    its upload holds the checkpoint."""
    single = run_cusa.main(tiny_run_args(backbone, data, tmp_path / "one", *COMMON, "--per_device_train_batch_size", "8",
                                         "--teacher_cache_dir", str(tmp_path / "cache_one"), *extra))  # fmt: skip
    assert "'loss'" in log and "'loss_csa'" in log
    one = CusaModel.from_pretrained(tmp_path / "one").state_dict()
    sharded = CusaModel.from_pretrained(output).state_dict()
    assert sharded.keys() == one.keys()
    for name, tensor in one.items():
        assert sharded[name].shape == tensor.shape, name  # the temperatures are saved as scalars again
        assert torch.allclose(sharded[name], tensor, atol=1e-4), name
    initial = CusaModel.from_backbone(backbone).state_dict()
    assert not torch.allclose(one["backbone.visual_projection.weight"], initial["backbone.visual_projection.weight"])
    results = json.loads((output / "results.json").read_text())
    for name, value in single["cusa"].items():
        if not name.endswith("_runtime"):
            assert results["cusa"][name] == pytest.approx(value, abs=1e-3), name
    # The same checkpoint as without FSDP: files (no torch _fsdp_*.py beside ours) and config (auto_map naming
    # modeling_cusa.CusaModel, architectures CusaModel), not only the weights.
    assert sorted(path.name for path in output.iterdir()) == sorted(path.name for path in (tmp_path / "one").iterdir())
    config, one_config = (json.loads((folder / "config.json").read_text()) for folder in (output, tmp_path / "one"))
    assert config["auto_map"]["AutoModel"] == "modeling_cusa.CusaModel" and config["architectures"] == ["CusaModel"]
    for info in (*config["teacher_info"].values(), *one_config["teacher_info"].values()):
        info.pop("table_file", None)  # each run has its own teacher cache folder
    assert config == one_config
    calls = {rank: json.loads((tmp_path / f"calls_{output.name}" / f"rank{rank}.json").read_text())
             for rank in range(num_processes)}  # fmt: skip
    assert all({"call": "save_model"} in calls[rank] for rank in range(num_processes)), calls
    commits = [call for call in calls[0] if call["call"] == "create_commit"]
    assert commits, calls[0]
    assert {"model.safetensors", "config.json", "README.md", "modeling_cusa.py"} <= set(commits[-1]["files"])
    assert [name for name in commits[-1]["files"] if name.endswith(".py")] == sorted(
        path.name for path in (tmp_path / "one").glob("*.py"))  # fmt: skip
    assert {"call": "validate_yaml"} in calls[0]
    for rank in range(1, num_processes):
        assert [call["call"] for call in calls[rank]] == ["save_model"], calls


def _fully_shard_and_save(folder):
    """In each of two gloo processes: a tiny CusaModel, its scalars vectorised as CusaTrainer does under FSDP, wrapped
    by FSDP2's ``fully_shard`` (which re-classes it as ``FSDPCusaModel``); its full state dict gathered and saved by
    rank 0 with ``save_pretrained`` (the temperatures as scalars again, as ``CusaTrainer._save`` does)."""
    from accelerate import PartialState
    from tiny_models import tiny_cusa_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from cusa_hf.fsdp import vectorize_scalar_parameters

    state = PartialState(cpu=True)
    model = tiny_cusa_model()
    scalars = vectorize_scalar_parameters(model)
    fully_shard(model)
    assert type(model).__name__ == "FSDPCusaModel"
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state.is_main_process:
        model.save_pretrained(folder, state_dict={name: tensor.reshape(()) if name in scalars else tensor
                                                  for name, tensor in full.items()})  # fmt: skip
    assert type(model).__name__ == "FSDPCusaModel"  # still wrapped after the save
    state.wait_for_everyone()


def test_a_fully_sharded_model_saves_the_checkpoint_of_an_unwrapped_one(tmp_path):
    """save_pretrained of the FSDPCusaModel writes what the plain CusaModel writes: the same files (our modeling
    files, not torch's _fsdp_*.py), config.json (auto_map naming modeling_cusa.CusaModel, so the folder loads with
    trust_remote_code as an unwrapped save does) and weights."""
    from tiny_models import tiny_cusa_model
    from two_process import spawn_launcher

    spawn_launcher(_fully_shard_and_save, args=(str(tmp_path / "sharded"),))
    tiny_cusa_model().save_pretrained(tmp_path / "plain")
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    assert sorted(path.name for path in sharded.iterdir()) == sorted(path.name for path in plain.iterdir())
    for name in (path.name for path in plain.glob("*.py")):
        assert (sharded / name).read_bytes() == (plain / name).read_bytes(), name
    config = json.loads((sharded / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_cusa.CusaModel" and config["architectures"] == ["CusaModel"]
    assert config == json.loads((plain / "config.json").read_text())
    expected, state = (CusaModel.from_pretrained(folder).state_dict() for folder in (plain, sharded))
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].shape == tensor.shape and torch.equal(state[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("itc_loss", ["infonce", "sigmoid"])
def test_fsdp_two_cpu_processes_train_save_and_push_like_one(tiny_backbone, shapes, tmp_path, itc_loss):  # noqa: F811
    """FSDP2 full shard in two gloo processes, features gathered: the checkpoint (full state dict gathered on rank 0,
    safetensors) loads with CusaModel.from_pretrained and equals one process trained on the same global batches;
    validation and test metrics match; push_to_hub has every rank join the save and rank 0 alone upload. With either
    contrastive term (the sigmoid term's two scalars are sharded as InfoNCE's temperature is)."""
    term = ["--itc_loss", itc_loss]
    output, log = accelerate_launch(tmp_path, fsdp_cpu_config(tmp_path), tiny_backbone, shapes, 2, *PUSH, *term,
                                    cpu=True, per_device_batch=4)  # fmt: skip
    assert "trained with fsdp=True as FSDPCusaModel" in log  # accelerate wrapped the model with fully_shard
    assert json.loads((output / "config.json").read_text())["itc_loss"] == itc_loss
    check_like_one_process(tmp_path, tiny_backbone, shapes, output, 2, log, *term)


@pytest.mark.slow
def test_fsdp_keeps_the_best_checkpoint_and_resumes_like_an_uninterrupted_run(
    tiny_backbone, shapes, tmp_path  # noqa: F811
):
    """Under FSDP2 a checkpoint holds accelerate's FSDP state (pytorch_model_fsdp.bin with the one-element
    temperatures, the sharded optimiser) beside the model.safetensors / config.json of an unwrapped save.
    load_best_model_at_end reloads the best checkpoint into the sharded model, and a run resumed from checkpoint-2
    (model, optimiser, schedule, data position) writes the same checkpoint-4 as the run that was not interrupted."""
    config_file = fsdp_cpu_config(tmp_path)
    # RSUM rises from step 2 to step 4 in this run: with lower-is-better the best checkpoint is not the last one, so
    # the final model is checkpoint-2's only if load_best_model_at_end reloaded it.
    steps = ["--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
             "--save_steps", "2", "--load_best_model_at_end", "true", "--metric_for_best_model", "rsum",
             "--greater_is_better", "false"]  # fmt: skip
    full, log = accelerate_launch(tmp_path, config_file, tiny_backbone, shapes, 2, *steps, cpu=True, per_device_batch=4,
                                  name="full")  # fmt: skip
    assert "trained with fsdp=True as FSDPCusaModel" in log and log.count("'loss_csa'") == 4
    weights = {}
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        folder = full / checkpoint
        files = {path.name for path in folder.iterdir()}
        assert {"model.safetensors", "pytorch_model_fsdp.bin", "modeling_cusa.py"} <= files
        assert not list(folder.glob("_fsdp*.py"))
        assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_cusa.CusaModel"
        weights[checkpoint] = CusaModel.from_pretrained(folder).state_dict()
        assert weights[checkpoint]["itc_temperature"].shape == ()
    assert not torch.equal(weights["checkpoint-2"]["backbone.visual_projection.weight"],
                           weights["checkpoint-4"]["backbone.visual_projection.weight"])  # fmt: skip
    state = json.loads((full / "checkpoint-4" / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-2", state["log_history"]
    final = CusaModel.from_pretrained(full).state_dict()
    for name, tensor in weights["checkpoint-2"].items():
        assert torch.equal(final[name], tensor), name

    resume = ["--resume_from_checkpoint", str(full / "checkpoint-2")]
    resumed, log = accelerate_launch(tmp_path, config_file, tiny_backbone, shapes, 2, *steps, *resume, cpu=True,
                                     per_device_batch=4, name="resumed")  # fmt: skip
    assert log.count("'loss_csa'") == 2  # steps 3 and 4 only: it went on from checkpoint-2
    again = CusaModel.from_pretrained(resumed / "checkpoint-4").state_dict()
    for name, tensor in weights["checkpoint-4"].items():
        assert torch.allclose(again[name], tensor, atol=1e-6), name


@pytest.mark.slow
def test_fsdp_with_a_sharded_state_dict_is_refused_before_training(tiny_backbone, shapes, tmp_path):  # noqa: F811
    """With SHARDED_STATE_DICT the Trainer would save no model.safetensors: CusaTrainer refuses it and names the fix."""
    config = yaml.safe_load(fsdp_cpu_config(tmp_path).read_text())
    config["fsdp_config"]["fsdp_state_dict_type"] = "SHARDED_STATE_DICT"
    config_file = tmp_path / "accelerate_fsdp_sharded_state.yaml"
    config_file.write_text(yaml.safe_dump(config))
    output, log = accelerate_launch(tmp_path, config_file, tiny_backbone, shapes, 2, cpu=True, per_device_batch=4,
                                    succeed=False)  # fmt: skip
    assert "CusaTrainer under FSDP needs fsdp_state_dict_type FULL_STATE_DICT" in log
    assert "trained with fsdp" not in log and not (output / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="FSDP through accelerate needs GPUs: accelerate 1.15 keeps "
                    "DistributedType.MULTI_CPU (plain DDP) for --cpu runs; benchmarks/fsdp_gpu_check.sh runs this")  # fmt: skip
def test_fsdp_on_gpus(tiny_backbone, shapes, tmp_path):  # noqa: F811
    """The same run, unpatched, on up to two GPUs with the repository's FSDP config as it is (bf16)."""
    num_processes = min(2, torch.cuda.device_count())
    output, log = accelerate_launch(tmp_path, CONFIGS / "accelerate_fsdp.yaml", tiny_backbone, shapes, num_processes,
                                    *PUSH, cpu=False, per_device_batch=8 // num_processes)  # fmt: skip
    assert "'loss'" in log and "trained with fsdp=True as FSDPCusaModel" in log
    model = CusaModel.from_pretrained(output)
    assert model.itc_temperature.shape == ()
    assert json.loads((output / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_cusa.CusaModel"
    assert not list(output.glob("_fsdp*.py"))
    for rank in range(1, num_processes):
        calls = json.loads((tmp_path / "calls_sharded" / f"rank{rank}.json").read_text())
        assert [call["call"] for call in calls] == ["save_model"], calls


@pytest.mark.parametrize("name", ["accelerate_fsdp.yaml", "accelerate_deepspeed_zero2.yaml"])
def test_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    if "fsdp" in name:
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    else:
        assert config.distributed_type == "DEEPSPEED"
        deepspeed_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"] == 2


def test_deepspeed_zero2_config_fills_from_the_training_arguments(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path), deepspeed=str(CONFIGS / "deepspeed_zero2.json"), per_device_train_batch_size=128,
                             use_cpu=True, report_to="none")  # fmt: skip
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    assert args.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"] == 128
