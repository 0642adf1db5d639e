"""Convert a released SGRAF checkpoint (``model_best.pth.tar``) into a ``save_pretrained`` folder.

A released checkpoint is a pickled dict: ``model`` = ``[img_enc, txt_enc, sim_enc]`` state dicts, ``opt`` = the
training ``argparse.Namespace`` (model sizes, module name, loss options), plus ``epoch``, ``best_rsum`` (a NumPy
scalar) and ``Eiters``. Because ``SgrafModel`` keeps the original submodule names, the weights are the three dicts
joined under the prefixes ``img_enc.``, ``txt_enc.``, ``sim_enc.`` and are loaded strictly.

Unpickling caveat: PyTorch >= 2.6 loads with ``weights_only=True``, which refuses ``argparse.Namespace`` and NumPy
scalars. :func:`load_original_checkpoint` allow-lists exactly those (they carry only plain values) and otherwise
refuses the file; ``trust_checkpoint=True`` falls back to full unpickling, which can run arbitrary code: use it only
for files from a source you trust.

Command line::

    python -m cusa_hf.models.sgraf.convert --checkpoint runs/coco_SGR/model_best.pth.tar \
        --vocab vocab/coco_precomp_vocab.json --output sgr-coco
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Any

import numpy as np
import torch

from .configuration_sgraf import SgrafConfig
from .modeling_sgraf import SgrafModel
from .tokenization_sgraf import SgrafTokenizer

SUBMODULE_PREFIXES = ("img_enc", "txt_enc", "sim_enc")
# Training options that are SgrafConfig fields with the same name and meaning.
OPTION_FIELDS = (
    "img_dim", "word_dim", "embed_size", "sim_dim", "num_layers", "bi_gru", "no_imgnorm", "no_txtnorm",
    "module_name", "sgr_step", "margin", "max_violation",
)


def _checkpoint_safe_globals() -> list[Any]:
    """The non-tensor globals a released checkpoint pickles: its options Namespace and NumPy scalars (best_rsum),
    under both the NumPy 1 (``numpy.core``) and NumPy 2 (``numpy._core``) module names."""
    scalar = np._core.multiarray.scalar
    return [
        argparse.Namespace,
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.float32)),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]


def load_original_checkpoint(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Load a released checkpoint on CPU, unpickling only tensors, the options Namespace and NumPy scalars unless
    ``trust_checkpoint`` (see the module docstring)."""
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust_checkpoint:
            raise ValueError(
                f"{path}: the checkpoint pickles objects beyond tensors, argparse.Namespace and NumPy scalars "
                f"({error}). If the file comes from a source you trust, pass trust_checkpoint=True "
                "to unpickle it fully."
            ) from None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "opt" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not an SGRAF checkpoint: expected a dict with 'model' and 'opt', got {keys}")
    if not isinstance(checkpoint["model"], (list, tuple)) or len(checkpoint["model"]) != 3:
        raise ValueError(f"{path}: 'model' must be the list [img_enc, txt_enc, sim_enc] of three state dicts")
    return checkpoint


def config_from_options(options: argparse.Namespace | dict, state_dict: dict[str, torch.Tensor]) -> SgrafConfig:
    """An ``SgrafConfig`` from the training options, with the vocabulary and region counts read off the weights."""
    options = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
    missing = [name for name in OPTION_FIELDS if name not in options]
    if missing:
        raise ValueError(f"checkpoint options lack {missing}; found {sorted(options)}")
    vocab_size = state_dict["txt_enc.embed.weight"].shape[0]
    if options.get("vocab_size") not in (None, vocab_size):
        raise ValueError(
            f"checkpoint options say vocab_size={options['vocab_size']} but txt_enc.embed.weight has {vocab_size} rows"
        )
    num_regions = state_dict["sim_enc.v_global_w.embedding_local.1.running_mean"].shape[0]
    return SgrafConfig(
        vocab_size=vocab_size,
        num_regions=num_regions,
        **{name: options[name] for name in OPTION_FIELDS},
    )


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
) -> SgrafModel:
    """Build an ``SgrafModel`` from a released checkpoint, load its weights strictly and, with ``output_dir``, save
    it (``model.safetensors`` + ``config.json``, and the tokenizer when ``vocab_file`` is given)."""
    checkpoint = load_original_checkpoint(checkpoint_path, trust_checkpoint)
    state_dict = {
        f"{prefix}.{key}": tensor
        for prefix, part in zip(SUBMODULE_PREFIXES, checkpoint["model"])
        for key, tensor in part.items()
    }
    config = config_from_options(checkpoint["opt"], state_dict)
    model = SgrafModel(config)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    tokenizer = SgrafTokenizer(vocab_file=str(vocab_file)) if vocab_file is not None else None
    if tokenizer is not None and len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"{vocab_file} has {len(tokenizer)} words but the checkpoint's embedding has {config.vocab_size} rows: "
            "use the vocabulary of the dataset the model was trained on"
        )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="released model_best.pth.tar")
    parser.add_argument("--output", required=True, help="folder for save_pretrained")
    parser.add_argument("--vocab", help="the original vocabulary JSON of the training data (saved as the tokenizer)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="allow full unpickling (only for files you trust)"
    )
    args = parser.parse_args(argv)
    model = convert_checkpoint(args.checkpoint, args.output, args.vocab, args.trust_checkpoint)
    print(f"converted {args.checkpoint} ({model.config.module_name}, vocab {model.config.vocab_size}) -> {args.output}")


if __name__ == "__main__":
    main()
