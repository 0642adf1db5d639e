"""FSDP support for ``CusaTrainer``: FSDP refuses 0-d parameters (the temperatures, CLIP's ``logit_scale``), and
evaluation calls ``get_*_features`` rather than ``forward``. (FSDP2 re-classes the model it wraps:
``CusaPreTrainedModel.save_pretrained`` saves it as its own class.)"""

from __future__ import annotations

import contextlib

from torch import nn


def vectorize_scalar_parameters(model: nn.Module) -> set[str]:
    """Replace every 0-d parameter of ``model`` by a one-element vector (FSDP1 and FSDP2 refuse scalars); returns
    their names. Arithmetic, ``clamp_`` and ``CusaModel.temperatures`` read them the same way."""
    names = set()
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dim() == 0:
                setattr(module, name, nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad))
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


@contextlib.contextmanager
def fsdp_unsharded(model: nn.Module | None):
    """Gather the full parameters of every FSDP2 unit of ``model`` for the duration (evaluation calls
    ``get_image_features`` / ``get_text_features``, not ``forward``, so FSDP's hooks would not gather the root's)."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)] if model is not None else []
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
