#!/usr/bin/env bash
# FSDP2 on GPUs: runs tests/test_sharded_training.py::test_fsdp_on_gpus, i.e. examples/run_cusa.py (tiny CLIP, gathered
# features, push_to_hub with the Hub mocked) under
#   accelerate launch --config_file examples/configs/accelerate_fsdp.yaml --num_processes min(2, GPUs)
# with the repository's config as it is (FSDP2 full shard, bf16, NCCL), nothing patched. It checks that accelerate
# wrapped the model with fully_shard, that the run logged its loss, that the output folder loads with
# CusaModel.from_pretrained (temperatures as scalars) with config.json's auto_map naming modeling_cusa.CusaModel and
# no torch _fsdp_*.py copied, and that only rank 0 uploaded.
#
# Without a CUDA GPU the test would skip; this script fails instead, so a skip is never read as a pass.
# Usage, from anywhere, with cusa-hf and its test dependencies installed:
#   bash benchmarks/fsdp_gpu_check.sh [extra pytest arguments]
# PYTHON selects the interpreter (default: python). Takes about a minute once the models are cached.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$gpus" -lt 1 ]; then
    echo "fsdp_gpu_check: no CUDA GPU visible (torch.cuda.device_count() == 0); accelerate 1.15 runs FSDP only on" \
         "accelerators, so there is nothing to check here" >&2
    exit 2
fi
echo "fsdp_gpu_check: $gpus GPU(s) visible; FSDP over $(( gpus < 2 ? gpus : 2 )) process(es)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c 'import accelerate, torch, transformers; print("torch", torch.__version__, "accelerate",
accelerate.__version__, "transformers", transformers.__version__)'

# -rs lists skip reasons; the summary must say "1 passed".
"$PYTHON" -m pytest tests/test_sharded_training.py::test_fsdp_on_gpus -q -rs -p no:cacheprovider "$@" \
    | tee /dev/stderr | grep -q "1 passed" || { echo "fsdp_gpu_check: test_fsdp_on_gpus did not pass" >&2; exit 1; }
echo "fsdp_gpu_check: passed"
