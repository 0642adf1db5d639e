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

# Written into each test's folder and launched instead of run_cusa.py: records every Hub call per rank (mocked at
# HfApi, as tests/test_modeling.py does) and, when asked, lets accelerate keep FSDP on CPU processes.
LAUNCHED = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {examples!r})
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    calls = os.path.join(os.environ["CUSA_TEST_HUB_CALLS"], "rank%s.json" % os.environ.get("RANK", "0"))
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
    HfApi.create_repo, HfApi.create_commit = create_repo, create_commit
    from huggingface_hub.repocard import RepoCard
    RepoCard.validate = lambda self, *args, **kwargs: None  # the card's YAML check is an HTTP call too

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


def accelerate_launch(tmp_path, config_file, backbone, data, num_processes, *, cpu, per_device_batch):
    """``accelerate launch --config_file ... run_cusa.py`` with the Hub mocked; returns the output folder."""
    script = tmp_path / "launched_run_cusa.py"
    script.write_text(LAUNCHED.format(examples=str(REPO / "examples")))
    (tmp_path / "hub_calls").mkdir()
    output = tmp_path / "sharded"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--num_processes", str(num_processes), "--main_process_port", str(free_port()), str(script),
               *tiny_run_args(backbone, data, output, *COMMON, "--per_device_train_batch_size", str(per_device_batch),
                              "--teacher_cache_dir", str(tmp_path / "cache_sharded"), "--push_to_hub", "true",
                              "--hub_model_id", "someone/tiny-cusa-fsdp", "--hub_token", "dummy",
                              "--use_cpu", str(cpu).lower())]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUSA_TEST_HUB_CALLS": str(tmp_path / "hub_calls"),
           "CUSA_TEST_FSDP_ON_CPU": "1" if cpu else "0"}  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    errors = [line for line in result.stderr.splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[-20:]) + result.stderr[-3000:]
    return output, result.stdout + result.stderr


def check_like_one_process(tmp_path, backbone, data, output, num_processes, log):
    """Weights and metrics of the sharded run equal one process on the same global batches; the sharded run
    trained (the loss was logged from every step), only rank 0 uploaded, and its upload holds the checkpoint."""
    single = run_cusa.main(tiny_run_args(backbone, data, tmp_path / "one", *COMMON, "--per_device_train_batch_size", "8",
                                         "--teacher_cache_dir", str(tmp_path / "cache_one")))  # fmt: skip
    assert "'loss'" in log and "'loss_csa'" in log
    one = CusaModel.from_pretrained(tmp_path / "one").state_dict()
    sharded = CusaModel.from_pretrained(output).state_dict()
    assert sharded.keys() == one.keys()
    for name, tensor in one.items():
        assert sharded[name].shape == tensor.shape, name  # the temperatures are saved as scalars again
        assert torch.allclose(sharded[name], tensor, atol=1e-4), name
    initial = CusaModel.from_backbone(backbone).state_dict()
    assert not torch.allclose(one["cross_image_projection.weight"], initial["cross_image_projection.weight"])
    results = json.loads((output / "results.json").read_text())
    for name, value in single["cusa"].items():
        if not name.endswith("_runtime"):
            assert results["cusa"][name] == pytest.approx(value, abs=1e-3), name
    calls = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "hub_calls").glob("rank*.json")}
    commits = [call for call in calls.get("rank0", []) if call["call"] == "create_commit"]
    assert commits and {"model.safetensors", "config.json", "README.md"} <= set(commits[-1]["files"])
    for rank in range(1, num_processes):
        assert not any(call["call"] == "create_commit" for call in calls.get(f"rank{rank}", [])), calls


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="open: rank 0's upload still calls https://huggingface.co/api/validate-yaml "
                   "(the Hub mock misses it), and under FSDP2 save_pretrained writes auto_map "
                   "'_fsdp_init.FSDPCusaModel' and copies torch's _fsdp_*.py files (the model class is fully_shard's "
                   "dynamic subclass); training, evaluation and the safetensors save already run")  # fmt: skip
def test_fsdp_two_cpu_processes_train_save_and_push_like_one(tiny_backbone, shapes, tmp_path):  # noqa: F811
    """FSDP2 full shard in two gloo processes, features gathered: the checkpoint (full state dict gathered on rank 0,
    safetensors) loads with CusaModel.from_pretrained and equals one process trained on the same global batches;
    validation and test metrics match; push_to_hub has every rank join the save and rank 0 alone upload."""
    config = yaml.safe_load((CONFIGS / "accelerate_fsdp.yaml").read_text())
    config.update(use_cpu=True, mixed_precision="no")
    config_file = tmp_path / "accelerate_fsdp_cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    output, log = accelerate_launch(tmp_path, config_file, tiny_backbone, shapes, 2, cpu=True, per_device_batch=4)
    assert "trained with fsdp=True as FSDPCusaModel" in log  # accelerate wrapped the model with fully_shard
    check_like_one_process(tmp_path, tiny_backbone, shapes, output, 2, log)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="FSDP through accelerate needs GPUs: accelerate 1.15 keeps "
                    "DistributedType.MULTI_CPU (plain DDP) for --cpu runs; benchmarks/fsdp_gpu_check.sh runs this")  # fmt: skip
def test_fsdp_on_gpus(tiny_backbone, shapes, tmp_path):  # noqa: F811
    """The same run, unpatched, on up to two GPUs with the repository's FSDP config as it is (bf16)."""
    num_processes = min(2, torch.cuda.device_count())
    output, log = accelerate_launch(tmp_path, CONFIGS / "accelerate_fsdp.yaml", tiny_backbone, shapes, num_processes,
                                    cpu=False, per_device_batch=8 // num_processes)  # fmt: skip
    assert "'loss'" in log and "trained with fsdp=True as FSDPCusaModel" in log
    model = CusaModel.from_pretrained(output)
    assert model.itc_temperature.shape == ()


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
