"""Two CPU processes (gloo) with gathered features give the loss and gradients of one process on the global batch."""

import os

import pytest
import torch
import torch.distributed as dist
from tiny_models import tiny_cusa_model
from two_process import free_port, start_processes

from cusa_hf.distributed import gather_with_grad

GLOBAL_BATCH = 8


def global_batch():
    generator = torch.Generator().manual_seed(11)
    return dict(
        pixel_values=torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
        input_ids=torch.randint(4, 40, (GLOBAL_BATCH, 6), generator=generator),
        attention_mask=torch.ones(GLOBAL_BATCH, 6, dtype=torch.long),
        image_ids=torch.tensor([0, 0, 1, 2, 3, 3, 4, 5]),
        teacher_image_embeds=torch.randn(GLOBAL_BATCH, 12, generator=generator),
        teacher_text_embeds=torch.randn(GLOBAL_BATCH, 10, generator=generator),
    )


def worker(rank, world_size, port, splits, result_dir, model_fields=None):
    """One process of a DDP step of the tiny model (``model_fields``: more CusaConfig fields) for each of ``splits``
    of :func:`global_batch`; rank 0 saves the loss, logits shape, gathered ids and gradients of each."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    for split in splits:  # one process group for every split: each spawn spends most of its time importing
        model = tiny_cusa_model(seed=0, gather_features=True, **(model_fields or {}))
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        start = sum(split[:rank])
        local = {key: value[start : start + split[rank]] for key, value in global_batch().items()}
        output = ddp(**local, return_loss=True)
        output.loss.backward()
        gathered_ids = gather_with_grad(local["image_ids"])
        if rank == 0:
            torch.save(
                {
                    "loss": output.loss.detach(),
                    "loss_itc": output.loss_itc.detach(),
                    "logits_shape": tuple(output.logits_per_image.shape),
                    "ids": gathered_ids,
                    "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
                },
                os.path.join(result_dir, result_name(split)),
            )
    dist.destroy_process_group()


SPLITS = [(4, 4), (3, 5)]


def result_name(split) -> str:
    return "rank0_" + "_".join(map(str, split)) + ".pt"


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Rank 0's loss, logits shape, gathered ids and gradients for each split of the global batch, from one spawn."""
    result_dir = tmp_path_factory.mktemp("two_process")
    start_processes(worker, args=(2, free_port(), SPLITS, str(result_dir)))
    return {split: torch.load(result_dir / result_name(split)) for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS)
def test_two_process_gather_equals_one_process(two_process_results, split):
    distributed = two_process_results[split]

    model = tiny_cusa_model(seed=0)
    model.train()
    output = model(**global_batch(), return_loss=True)
    output.loss.backward()

    assert distributed["logits_shape"] == (GLOBAL_BATCH, GLOBAL_BATCH)
    assert torch.equal(distributed["ids"], global_batch()["image_ids"])
    assert torch.allclose(distributed["loss"], output.loss.detach(), atol=1e-6)
    single_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert distributed["grads"].keys() == single_grads.keys()
    for name, grad in single_grads.items():
        assert torch.allclose(distributed["grads"][name], grad, atol=1e-5, rtol=1e-4), name
