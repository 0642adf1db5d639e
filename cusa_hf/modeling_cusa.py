"""CusaModel: a vision-text backbone with CUSA's cross-modal projectors, USA heads, temperatures and losses."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbones import TOWER_NAMES, BackboneAdapter, BackboneFeatures, adapter_class_for
from .configuration_cusa import PROJECTOR, TEMPERATURE_FIELDS, CusaConfig, cusa_field_names
from .contrastive_terms import contrastive_term_class
from .losses import CusaLoss, CusaLossOutput
# Imported to register the SigLIP adapters, here so that the code saved with every checkpoint has them.
from .siglip_backbones import Siglip2Adapter, SiglipAdapter  # noqa: F401


logger = logging.getLogger(__name__)

#: Keywords of ``from_pretrained`` that say where a saved config.json is found.
_HUB_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download")


def _saved_config_dict(name_or_path: str | os.PathLike, options: dict | None) -> dict | None:
    """The config.json of a folder or Hub repo (``options``: ``from_pretrained`` keywords, the Hub ones are used), or
    ``None`` when there is none to read (the model's own loader then raises its error)."""
    hub_options = {key: value for key, value in (options or {}).items() if key in _HUB_OPTIONS}
    try:
        config_dict, _ = CusaConfig.get_config_dict(name_or_path, **hub_options)
    except OSError:
        return None
    return config_dict


def damaged_weights_file(folder: str | os.PathLike) -> OSError | None:
    """The error naming the first ``*.safetensors`` file of a local checkpoint folder whose header does not read or
    does not cover the file (cut off while saved or copied), or ``None``; reads only the headers."""
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            try:
                with safe_open(path, framework="pt"):
                    pass
            except (SafetensorError, OSError) as error:
                return OSError(
                    f"{path}: the weights file is damaged ({error}); it was cut off or corrupted while it was saved, "
                    "copied or downloaded. Save or fetch the checkpoint again"
                )
    return None


def check_model_folder(name_or_path: str | os.PathLike, parameter: str) -> None:
    """Refuse a local folder that holds no model itself but model folders (a baseline comparison's ``baseline/`` and
    ``cusa/``), naming them, rather than let the loader say "Unrecognized model"."""
    folder = os.fspath(name_or_path)
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "config.json")):
        return
    inside = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name, "config.json")))
    if inside:
        raise ValueError(
            f"{parameter}={folder!r} holds no model itself but {len(inside)} model folders ({', '.join(inside)}), as a "
            f"baseline comparison writes; pass one of them, e.g. {os.path.join(folder, inside[-1])!r}"
        )


def is_cusa_checkpoint(name_or_path: str | os.PathLike, backbone_kwargs: dict | None = None) -> bool:
    """``name_or_path`` holds a saved ``CusaModel`` (its config.json says ``model_type: cusa``)."""
    return (_saved_config_dict(name_or_path, backbone_kwargs) or {}).get("model_type") == CusaConfig.model_type


def _scalar_value(parameter: torch.Tensor) -> float:
    """The value of a one-element parameter; under FSDP2 a sharded DTensor, gathered first (a collective)."""
    parameter = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
    return float(parameter.detach().reshape(()))


@dataclass
class CusaOutput(ModelOutput):
    """Output of [`CusaModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, returned with `return_loss=True`):
            `loss_itc + csa_weight * loss_csa + usa_weight * loss_usa`.
        loss_itc (`torch.FloatTensor` of shape `()`): the backbone's original loss (multi-positive InfoNCE unless the
            backbone brings its own, e.g. ITC + ITM for X2VLM).
        loss_csa (`torch.FloatTensor` of shape `()`): mean of the two CSA directions (0 when CSA is inactive).
        loss_usa (`torch.FloatTensor` of shape `()`): mean of the two USA terms (0 when USA is inactive).
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`): the contrastive
            term's logits: cross-modal similarities divided by the InfoNCE temperature, or scaled and shifted by the
            sigmoid term's log-scale and bias (the global batch when `gather_features` is on).
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised cross-modal image
            embeddings of this process's batch.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised cross-modal text
            embeddings.
        uni_image_embeds (`torch.FloatTensor` of shape `(batch_size, feature_dim)`): L2-normalised USA-head image
            embeddings (`None` without USA heads).
        uni_text_embeds (`torch.FloatTensor` of shape `(batch_size, feature_dim)`): L2-normalised USA-head text
            embeddings (`None` without USA heads).
        softlabel_stats (`dict[str, torch.FloatTensor]`): diagnostics of the teachers' soft labels (row entropy,
            same-image mass; see `cusa_hf.losses.soft_label_diagnostics`), with the loss while CSA or USA is active.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_csa: torch.FloatTensor | None = None
    loss_usa: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    uni_image_embeds: torch.FloatTensor | None = None
    uni_text_embeds: torch.FloatTensor | None = None
    softlabel_stats: dict[str, torch.FloatTensor] | None = None


class CusaProjection(nn.Module):
    """LayerNorm followed by Linear, the authors' projector for both the cross-modal projectors and the USA heads."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(input_dim)
        self.linear = nn.Linear(input_dim, output_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.layer_norm(features))


class CusaPreTrainedModel(PreTrainedModel):
    config_class = CusaConfig
    base_model_prefix = "cusa"
    # Captions come as input_ids (or, with a frozen text tower, its cached text_tower_features), images as
    # pixel_values or image_tower_features; the Trainer counts tokens from input_ids.
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # forward takes **backbone_kwargs, not the Trainer's num_items_in_batch: without this the Trainer would assume the
    # loss is already normalised for gradient accumulation and skip dividing it by the accumulation steps.
    accepts_loss_kwargs = False
    # A CNN tower saved with frozen BatchNorm (timm's FrozenBatchNorm2d) has no step counters; they only matter for
    # BatchNorm with momentum=None, so a fresh counter is not a missing weight.
    _keys_to_ignore_on_load_missing = [r"num_batches_tracked$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained``, refusing a folder or Hub repo that holds another kind of model (a
        plain CLIP or BERT would otherwise load as a randomly initialised CUSA model with a warning)."""
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            config_dict = _saved_config_dict(pretrained_model_name_or_path, kwargs)
            model_type = (config_dict or {}).get("model_type", CusaConfig.model_type)
            if model_type != CusaConfig.model_type:
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds a {model_type!r} model (config.json model_type), not a "
                    f"CUSA checkpoint. To fine-tune it with CUSA, wrap it: "
                    f"CusaModel.from_backbone({str(pretrained_model_name_or_path)!r})"
                )
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            if not os.path.isdir(pretrained_model_name_or_path):
                raise OSError(
                    f"{pretrained_model_name_or_path}: a weights file of this checkpoint is damaged ({error}); load it "
                    "again with force_download=True"
                ) from None
            damaged = damaged_weights_file(pretrained_model_name_or_path)
            if damaged is None:
                raise
            raise damaged from None
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        if isinstance(model, CusaModel):
            model.set_scalars_trainable()
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained``, also of a model that FSDP2's ``fully_shard`` has re-classed as torch's
        generated ``FSDPCusaModel``: it is saved as its own class, so config.json's ``auto_map`` names
        ``modeling_cusa.CusaModel`` and only this package's modeling files are copied beside the weights (the
        remote-code save copies the module defining ``type(self)``, which would be torch's ``_fsdp_init.py``).
        Resolved here rather than in ``cusa_hf.fsdp``: every relative import of this file is copied into checkpoints."""
        wrapped_class = type(self)
        # fully_shard (and torch's replicate) re-class a module as type("FSDP" + name, (FSDPModule, cls), ...).
        self.__class__ = next(
            cls for cls in wrapped_class.__mro__ if not cls.__module__.startswith("torch.distributed.")
        )
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapped_class

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, CusaProjection):
            # As the authors' initialize_parameters: the Linear weight from N(0, 0.02); the bias and the LayerNorm keep
            # PyTorch's defaults (drawn here too, for weights a checkpoint lacks that from_pretrained fills).
            init.normal_(module.linear.weight, mean=0.0, std=0.02)
            bound = 1 / math.sqrt(module.linear.in_features)
            init.uniform_(module.linear.bias, -bound, bound)
            init.ones_(module.layer_norm.weight)
            init.zeros_(module.layer_norm.bias)
        elif isinstance(module, CusaModel):
            initial = {name: getattr(self.config, name) for name, _, _ in TEMPERATURE_FIELDS}
            initial.update(module.cusa_loss.itc_term.initial_scalars(self.config))
            for name, value in initial.items():
                parameter = getattr(module, name, None)
                if parameter is not None:
                    init.constant_(parameter, value)


class CusaModel(CusaPreTrainedModel):
    """A retrieval backbone fine-tuned with CUSA.

    ``backbone`` is the wrapped vision-text model (e.g. ``CLIPModel``); the adapter chosen by its ``model_type``
    gives pooled features. On top sit the cross-modal projectors (retrieval embeddings), the USA heads (uni-modal
    embeddings) and the learnable temperatures. See ``docs/model.md`` for every formula.
    """

    def __init__(self, config: CusaConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        adapter_class = adapter_class_for(config.backbone_config.model_type)
        self.backbone = backbone if backbone is not None else adapter_class.build_backbone(config.backbone_config)
        self.adapter: BackboneAdapter = adapter_class(self.backbone)
        if config.itc_loss is None:
            config.itc_loss = self.adapter.default_itc_loss
        itc_term_class = contrastive_term_class(config.itc_loss)
        if self.adapter.has_original_loss and config.itc_loss != self.adapter.default_itc_loss:
            raise ValueError(
                f"itc_loss={config.itc_loss!r} cannot be used with a {config.backbone_config.model_type!r} backbone: it "
                "trains with its own loss; leave itc_loss unset (None)"
            )

        image_dim, text_dim = self.adapter.image_feature_dim, self.adapter.text_feature_dim
        self.uses_cross_projection = (
            config.cross_projection
            if config.cross_projection is not None
            else not (self.adapter.scores_pairs_itself or self.adapter.has_original_loss)
        )
        if self.uses_cross_projection and self.adapter.scores_pairs_itself:
            raise ValueError(
                f"cross_projection=True cannot be used with a {config.backbone_config.model_type!r} backbone: "
                "it scores image-text pairs itself, so there are no pooled features to project for retrieval"
            )
        if self.uses_cross_projection:
            projection_dim = config.projection_dim or image_dim
            self.cross_image_projection = self._new_projection(image_dim, projection_dim)
            self.cross_text_projection = self._new_projection(text_dim, projection_dim)
        elif image_dim != text_dim and not self.adapter.scores_pairs_itself:
            raise ValueError(
                f"the backbone's image features ({image_dim}-d) and text features ({text_dim}-d) differ in width; "
                "set cross_projection=True (and optionally projection_dim) to compare them"
            )
        self.tower_dropout = None
        if config.tower_dropout > 0:
            if not (self.adapter.has_separable_image_tower and self.adapter.has_separable_text_tower):
                raise ValueError(
                    f"tower_dropout={config.tower_dropout} needs a backbone whose towers and projections are separate "
                    f"(CLIP, VisionTextDualEncoder); a {config.backbone_config.model_type!r} backbone is not"
                )
            self.tower_dropout = nn.Dropout(config.tower_dropout)
        if config.use_usa:
            self.usa_image_head = self._new_projection(image_dim, image_dim)
            self.usa_text_head = self._new_projection(text_dim, text_dim)

        # Temperatures (and the contrastive term's scalars) exist only where they are used, so DDP never sees a
        # parameter without a gradient. The term's scalars are the backbone's where it brings trained ones.
        scalars = {} if self.adapter.has_original_loss else itc_term_class.initial_scalars(config)
        for name in self.adapter.own_contrastive_scalars(config.itc_loss):
            scalars.pop(name)
        if config.use_csa:
            scalars["csa_temperature"] = config.csa_temperature
        if config.use_usa:
            scalars.update(usa_image_temperature=config.usa_image_temperature, usa_text_temperature=config.usa_text_temperature)
        for name, value in scalars.items():
            self.register_parameter(name, nn.Parameter(torch.tensor(float(value))))
        self.set_scalars_trainable()
        self.cusa_loss = CusaLoss.from_config(config)
        self.post_init()

    def set_scalars_trainable(self) -> None:
        """Train the loss's scalars (this model's temperatures and contrastive-term scalars, and the backbone's own
        where the term takes them) as ``config.learnable_temperatures`` says, and freeze the backbone's scalars that
        the loss does not read. ``from_pretrained`` calls it again: transformers loads every weight as a trainable
        parameter."""
        self.adapter.freeze_backbone_scalars()
        own = self.adapter.own_contrastive_scalars(self.config.itc_loss).values()
        for parameter in [*own, *self.parameters(recurse=False)]:
            parameter.requires_grad_(self.config.learnable_temperatures)

    def _new_projection(self, input_dim: int, output_dim: int) -> CusaProjection:
        """A projector drawn as the authors draw theirs. transformers 5 runs ``_init_weights`` only on weights that
        ``from_pretrained`` finds missing, not on a model built here, so each is drawn as it is built (one after the
        other, so a model with and without USA heads gets the same cross projectors from one seed); loaded weights
        replace these draws."""
        projection = CusaProjection(input_dim, output_dim)
        self._init_weights(projection)
        return projection

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        backbone: PreTrainedModel | str | os.PathLike,
        backbone_kwargs: dict | None = None,
        fresh_heads: bool = False,
        **cusa_fields: Any,
    ) -> "CusaModel":
        """Wrap a pretrained backbone (a model, a Hub name such as ``openai/clip-vit-base-patch32``, or a local
        folder) with freshly initialised CUSA projectors and heads, keeping the backbone's pretrained weights.

        ``backbone`` may also be a saved CUSA checkpoint (a ``CusaModel``, or the folder / Hub id of one): the new model
        starts from it, see :meth:`_continue_from`; with ``fresh_heads=True`` only its backbone is kept.

        Fresh projectors and heads are drawn as the authors draw them: Linear weights from N(0, 0.02), biases and
        LayerNorms at PyTorch's defaults; temperatures start at ``cusa_fields``' (else CusaConfig's) initial values.

        Args:
            backbone: the backbone model or its name/path, or a CUSA checkpoint.
            backbone_kwargs: passed to the backbone's ``from_pretrained`` when ``backbone`` is a name/path.
            fresh_heads: with a CUSA checkpoint, keep only its trained backbone (towers and their projections) and
                start the cross-modal projectors, USA heads and temperatures fresh, as the authors put fresh projectors
                on a pretrained CLIP; the projector layout is then this call's (``projection_dim``, ...). Refused
                for a backbone that is no CUSA checkpoint.
            **cusa_fields: any [`CusaConfig`] field (``csa_weight=0.1``, ``use_usa=False``, ...).

        Example::

            >>> model = CusaModel.from_backbone("openai/clip-vit-base-patch32")       # fresh CUSA heads
            >>> model = CusaModel.from_backbone("outputs/cusa-default/baseline")       # a trained CUSA checkpoint
            >>> model = CusaModel.from_backbone("outputs/cusa-default/baseline", fresh_heads=True)  # its backbone only
        """
        if isinstance(backbone, str) and backbone.startswith("builtin:"):
            # A name only run_cusa's settings know (ModelArguments.backbone); it would otherwise fail as a Hub id.
            raise ValueError(
                f"backbone={backbone!r} names run_cusa's built-in student, not a model to load; in Python build it with "
                "CusaModel.from_backbone(cusa_hf.models.builtin_student.builtin_backbone())"
            )
        if isinstance(backbone, (str, os.PathLike)):
            check_model_folder(backbone, "backbone")
        if isinstance(backbone, (str, os.PathLike)) and is_cusa_checkpoint(backbone, backbone_kwargs):
            backbone = cls.from_pretrained(backbone, **(backbone_kwargs or {}))
        if isinstance(backbone, CusaModel) and not fresh_heads:
            return cls._continue_from(backbone, **cusa_fields)
        checkpoint_name = None
        if isinstance(backbone, CusaModel):
            checkpoint_name, backbone = backbone.config._name_or_path or "(in memory)", backbone.backbone
        elif fresh_heads:
            raise ValueError(
                f"fresh_heads=True keeps only the backbone of a CUSA checkpoint, and {backbone!r} is not one (its CUSA "
                "parts are fresh anyway); leave fresh_heads unset"
            )
        if isinstance(backbone, (str, os.PathLike)):
            try:
                backbone_config = AutoConfig.from_pretrained(backbone, **(backbone_kwargs or {}))
            except OSError as error:  # the Hub's message (offline, no such repo) does not always name the id
                if os.path.exists(os.fspath(backbone)):
                    raise
                raise OSError(f"backbone={os.fspath(backbone)!r}: no such local folder, and no Hub model of that id "
                              f"could be loaded ({error})") from None
            adapter_class = adapter_class_for(backbone_config.model_type)
            backbone = adapter_class.load_backbone(str(backbone), **(backbone_kwargs or {}))
        pretrained_state = {name: tensor.detach().clone() for name, tensor in backbone.state_dict().items()}
        attn_implementation = backbone.config._attn_implementation
        model = cls(CusaConfig(backbone_config=backbone.config, **cusa_fields), backbone=backbone)
        # post_init may re-initialise the backbone's weights; put the pretrained ones back.
        model.backbone.load_state_dict(pretrained_state)
        # Wrapping resets the backbone config's attention implementation to None, with which CLIP's text tower
        # attends to padding (features then depend on how a batch is padded); keep the backbone's own.
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if checkpoint_name is not None:
            logger.info(
                "starting from the backbone of the CUSA checkpoint %s (fresh_heads): trained backbone; fresh: %s",
                checkpoint_name, ", ".join(model.cusa_part_names()),
            )  # fmt: skip
        return model

    def cusa_part_names(self) -> list[str]:
        """The names of the parts CUSA adds on top of the backbone: projectors, USA heads and temperatures."""
        return [name for name, _ in self.named_children() if name.startswith(("cross_", "usa_"))] + sorted(
            name for name, _ in self.named_parameters(recurse=False)
        )

    @classmethod
    def _continue_from(cls, checkpoint: "CusaModel", **cusa_fields: Any) -> "CusaModel":
        """A model that starts from a trained CUSA checkpoint: its backbone (towers and their projections), its
        cross-modal projectors and every temperature it has, trained; its USA heads when it has them and
        ``cusa_fields`` keep USA on. What the checkpoint lacks (USA heads or the CSA temperature of an InfoNCE
        baseline) starts fresh, initial temperatures from ``cusa_fields``.

        The loss settings are the new run's, as for any backbone: ``cusa_fields``, else CusaConfig's defaults (to go on
        with the checkpoint's own settings, load it with ``from_pretrained``). The teacher widths and provenance are
        left for the next training run to record from its own teachers. The projector layout (``cross_projection``,
        ``projection_dim``) is the checkpoint's: a different value is refused rather than silently re-initialised.
        """
        saved = checkpoint.config
        projector_fields = cusa_field_names(PROJECTOR)  # the checkpoint's, kept
        for name in projector_fields:
            wanted, kept = cusa_fields.get(name), getattr(saved, name)
            if name == "projection_dim" and kept is None and checkpoint.uses_cross_projection:  # the backbone's width
                kept = checkpoint.cross_image_projection.linear.out_features
            if wanted is not None and wanted != kept:
                raise ValueError(
                    f"{name}={wanted!r} differs from the checkpoint's {name}={kept!r}: starting from a "
                    f"CUSA checkpoint keeps its trained projectors; leave {name} unset (None)"
                )
        fields = {name: value for name, value in cusa_fields.items() if name not in projector_fields}
        fields.update({name: getattr(saved, name) for name in projector_fields})
        trained_temperatures = checkpoint.temperatures()
        # The config's initial temperatures say where the new run starts: the checkpoint's trained values (a float32
        # value clamped to a bound may lie a rounding error outside it).
        for name, min_name, max_name in TEMPERATURE_FIELDS:
            if name in trained_temperatures:
                low, high = (fields.get(bound, getattr(CusaConfig, bound)) for bound in (min_name, max_name))
                fields[name] = min(max(trained_temperatures[name], low), high)
        # Cloned first: building the new model may re-initialise the (shared) backbone's weights in place.
        state = {name: tensor.detach().clone() for name, tensor in checkpoint.state_dict().items()}
        attn_implementation = checkpoint.backbone.config._attn_implementation
        model = cls(CusaConfig(backbone_config=saved.backbone_config, **fields), backbone=checkpoint.backbone)
        missing, unexpected = model.load_state_dict(state, strict=False)
        fresh = sorted({key.split(".")[0] for key in missing if not key.endswith("num_batches_tracked")})
        unknown = [key for key in fresh if key.startswith(("backbone", "cross_"))]
        if unknown:
            raise ValueError(f"the CUSA checkpoint lacks trained weights for {unknown}; it does not match its config")
        dropped = sorted({key.split(".")[0] for key in unexpected})
        logger.info(
            "starting from the CUSA checkpoint %s: trained backbone, cross-modal projectors and %s%s%s",
            saved._name_or_path or "(in memory)",
            ", ".join(sorted(trained_temperatures)) or "no temperatures",
            f"; fresh: {', '.join(fresh)}" if fresh else "",
            f"; not used by this run: {', '.join(dropped)}" if dropped else "",
        )
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model

    # ------------------------------------------------------------------ temperatures
    @torch.no_grad()
    def clamp_temperatures_(self) -> None:
        """Clamp every learnable temperature to its configured bounds (in place), as the authors do every step.

        ``CusaTrainer`` calls this after every optimiser step; a hand-written training loop should too (after
        ``optimizer.step()``), as open_clip clamps ``logit_scale``."""
        for name, min_name, max_name in TEMPERATURE_FIELDS:
            parameter = getattr(self, name, None)
            if parameter is not None:
                parameter.clamp_(getattr(self.config, min_name), getattr(self.config, max_name))

    def temperatures(self) -> dict[str, float]:
        """Current values of the temperatures this model has, by config field name. Under FSDP2 a temperature is a
        sharded one-element DTensor whose value is gathered first (a collective: every process must call this)."""
        parameters = {name: getattr(self, name, None) for name, _, _ in TEMPERATURE_FIELDS}
        return {name: _scalar_value(parameter) for name, parameter in parameters.items() if parameter is not None}

    def itc_scalar_values(self) -> dict[str, float]:
        """Current values of the contrastive term's learnable scalars (:meth:`itc_scalars`: ``itc_temperature``, or
        the sigmoid term's ``itc_logit_scale`` and ``itc_logit_bias``, the backbone's own where it brings them), by
        name; gathered under FSDP2 as :meth:`temperatures` (every process must call this)."""
        return {name: _scalar_value(parameter) for name, parameter in self.itc_scalars().items() if parameter is not None}

    def itc_scalars(self) -> dict[str, torch.Tensor | None]:
        """The contrastive term's learnable scalars by name (``itc_temperature``, or ``itc_logit_scale`` and
        ``itc_logit_bias``): the backbone's own where it brings them, else this model's; ``None`` for a backbone that
        trains with its own loss."""
        own = self.adapter.own_contrastive_scalars(self.config.itc_loss)
        return {name: own.get(name, getattr(self, name, None)) for name in self.cusa_loss.itc_term.scalar_names}

    def loss_scalars(self) -> dict[str, torch.Tensor | None]:
        """The scalars ``CusaLoss`` reads, by its keyword names: the temperatures this model has, and the contrastive
        term's (:meth:`itc_scalars`)."""
        scalars = {name: getattr(self, name, None) for name, _, _ in TEMPERATURE_FIELDS}
        scalars = {name: value for name, value in scalars.items() if value is not None}
        scalars.update(self.itc_scalars())
        return scalars

    def loss_parameters(self) -> dict[str, nn.Parameter]:
        """Every learnable scalar of the loss (temperatures and the contrastive term's), by name, that this model
        trains; the gradient-cached step computes their gradients from the loss itself."""
        return {name: value for name, value in self.loss_scalars().items() if value is not None and value.requires_grad}

    def get_input_embeddings(self) -> nn.Module | None:
        """The backbone's token embedding, or None (accelerate's FSDP2 wrapping asks for it)."""
        try:
            return self.backbone.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            return None

    # ------------------------------------------------------------------ embeddings
    def _cross_embeds(self, features: torch.Tensor, projection: str) -> torch.Tensor:
        if self.uses_cross_projection:
            features = getattr(self, projection)(features)
        return F.normalize(features, dim=-1)

    def _uni_embeds(self, features: torch.Tensor, head: str) -> torch.Tensor:
        if self.config.use_usa:
            features = getattr(self, head)(features)
        return F.normalize(features, dim=-1)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        head: str = "cross",
        image_tower_features: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """L2-normalised image embeddings, `(batch_size, dim)`.

        Args:
            pixel_values: `(batch_size, channels, height, width)` processed images.
            head: ``"cross"`` for image-text retrieval, ``"uni"`` for image-image similarity (the USA head; a model
                without USA heads returns its backbone's normalised pooled features).
            image_tower_features: `(batch_size, image_tower_dim)` cached output of the frozen vision tower
                (``cusa_hf.add_image_tower_features``), given instead of ``pixel_values``.
            pixel_attention_mask, spatial_shapes: SigLIP 2's NaFlex inputs, as its image processor gives them (named
                here so that callers that pass only named inputs, as sentence-transformers does, can give them).
        """
        if (pixel_values is None) == (image_tower_features is None):
            raise ValueError("get_image_features needs exactly one of pixel_values or image_tower_features")
        naflex = {"pixel_attention_mask": pixel_attention_mask, "spatial_shapes": spatial_shapes}
        kwargs.update({name: value for name, value in naflex.items() if value is not None})
        features = self._image_features(pixel_values, image_tower_features, **kwargs)
        return self._select_head(head, features, "cross_image_projection", "usa_image_head")

    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head: str = "cross",
        text_tower_features: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """L2-normalised text embeddings, `(batch_size, dim)`; ``head`` as in :meth:`get_image_features`.

        ``text_tower_features`` (`(batch_size, text_tower_dim)`, the cached output of a frozen text tower from
        ``cusa_hf.add_text_tower_features``) can be given instead of ``input_ids``.
        """
        if (input_ids is None) == (text_tower_features is None):
            raise ValueError("get_text_features needs exactly one of input_ids or text_tower_features")
        features = self._text_features(input_ids, attention_mask, text_tower_features, **kwargs)
        return self._select_head(head, features, "cross_text_projection", "usa_text_head")

    def _image_features(self, pixel_values, image_tower_features, **kwargs) -> torch.Tensor:
        """The backbone's image features, from pixels or a frozen tower's cached output (``tower_dropout`` between
        tower and projection)."""
        if image_tower_features is not None:
            return self._project_cached_tower("image", image_tower_features)
        if self.tower_dropout is not None:
            image_inputs = {name: kwargs[name] for name in self.adapter.image_input_names if name in kwargs}
            tower_features = self.adapter.encode_image_tower(pixel_values, **image_inputs)
            return self.adapter.project_image_tower(self.tower_dropout(tower_features))
        return self.adapter.encode_image(pixel_values, **kwargs)

    def _text_features(self, input_ids, attention_mask, text_tower_features, **kwargs) -> torch.Tensor:
        """The backbone's text features, from tokens or a frozen tower's cached output."""
        if text_tower_features is not None:
            return self._project_cached_tower("text", text_tower_features)
        if self.tower_dropout is not None:
            tower_features = self.adapter.encode_text_tower(input_ids, attention_mask)
            return self.adapter.project_text_tower(self.tower_dropout(tower_features))
        return self.adapter.encode_text(input_ids, attention_mask, **kwargs)

    def _select_head(self, head: str, features: torch.Tensor, cross_projection: str, uni_head: str) -> torch.Tensor:
        if head == "cross":
            if self.adapter.scores_pairs_itself:
                raise ValueError(
                    f"a {self.config.backbone_config.model_type!r} backbone scores image-text pairs itself; "
                    "use its pairwise scorer for cross-modal retrieval (head='uni' gives uni-modal embeddings)"
                )
            return self._cross_embeds(features, cross_projection)
        if head == "uni":
            return self._uni_embeds(features, uni_head)
        raise ValueError(f"head={head!r} is not supported; use 'cross' or 'uni'")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        teacher_image_embeds: torch.Tensor | None = None,
        teacher_text_embeds: torch.Tensor | None = None,
        return_loss: bool | None = None,
        image_tower_features: torch.Tensor | None = None,
        text_tower_features: torch.Tensor | None = None,
        **backbone_kwargs: Any,
    ) -> CusaOutput:
        r"""
        Args:
            pixel_values (`(batch_size, channels, height, width)`): images of the aligned image-text pairs.
            input_ids (`(batch_size, sequence_length)`), attention_mask (`(batch_size, sequence_length)`): captions.
            image_ids (`(batch_size,)` long, *optional*): image id of each pair; pairs sharing an id are all positives
                of each other in InfoNCE (COCO/Flickr have ~5 captions per image).
            teacher_image_embeds (`(batch_size, image_teacher_dim)`, *optional*): frozen image-teacher features,
                required for the loss while CSA or USA is active.
            teacher_text_embeds (`(batch_size, text_teacher_dim)`, *optional*): frozen text-teacher features.
            return_loss (`bool`, *optional*): compute the loss (defaults to `True` in training mode).
            image_tower_features (`(batch_size, image_tower_dim)`, *optional*): the cached pooled output of a frozen
                vision tower, given instead of `pixel_values` (see `cusa_hf.frozen_towers.add_image_tower_features`).
            text_tower_features (`(batch_size, text_tower_dim)`, *optional*): the cached pooled output of a frozen
                text tower, given instead of `input_ids` (see `cusa_hf.frozen_towers.add_text_tower_features`).
        """
        if return_loss is None:
            return_loss = self.training
        if (input_ids is None) == (text_tower_features is None) or (pixel_values is None) == (image_tower_features is None):
            raise ValueError(
                "CusaModel.forward needs a batch of image-text pairs: exactly one of pixel_values or "
                "image_tower_features, and exactly one of input_ids or text_tower_features"
            )
        if image_tower_features is None and text_tower_features is None and self.tower_dropout is None:
            features = self.adapter.forward_features(pixel_values, input_ids, attention_mask, **backbone_kwargs)
        else:
            features = BackboneFeatures(
                image_features=self._image_features(pixel_values, image_tower_features, **backbone_kwargs),
                text_features=self._text_features(input_ids, attention_mask, text_tower_features, **backbone_kwargs),
            )
        if self.adapter.scores_pairs_itself:
            image_embeds = F.normalize(features.image_features, dim=-1)
            text_embeds = F.normalize(features.text_features, dim=-1)
        else:
            image_embeds = self._cross_embeds(features.image_features, "cross_image_projection")
            text_embeds = self._cross_embeds(features.text_features, "cross_text_projection")
        uni_image_embeds = uni_text_embeds = None
        if self.config.use_usa:
            uni_image_embeds = self._uni_embeds(features.image_features, "usa_image_head")
            uni_text_embeds = self._uni_embeds(features.text_features, "usa_text_head")
        output = CusaOutput(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            uni_image_embeds=uni_image_embeds,
            uni_text_embeds=uni_text_embeds,
        )
        if return_loss:
            losses = self.loss_from_embeddings(
                output,
                image_ids=image_ids,
                teacher_image_embeds=teacher_image_embeds,
                teacher_text_embeds=teacher_text_embeds,
                pair_similarity=features.similarity,
                itc_terms=self.adapter.original_loss(features, image_ids, self.cusa_loss.gather),
            )
            output.loss, output.loss_itc, output.loss_csa, output.loss_usa = (
                losses.loss, losses.loss_itc, losses.loss_csa, losses.loss_usa
            )
            output.softlabel_stats = losses.softlabel_stats or None
            logits_per_image = losses.logits_per_image
        else:
            if features.text_features.shape[0] != features.image_features.shape[0]:
                raise ValueError(
                    f"got {features.image_features.shape[0]} images but {features.text_features.shape[0]} captions: "
                    "CusaModel.forward scores aligned pairs"
                )
            similarity = features.similarity if features.similarity is not None else image_embeds @ text_embeds.t()
            logits_per_image = self.cusa_loss.itc_term.logits(similarity, **self.itc_scalars())
        output.logits_per_image, output.logits_per_text = logits_per_image, logits_per_image.t()
        return output

    def loss_from_embeddings(
        self,
        embeddings: CusaOutput,
        image_ids: torch.Tensor | None = None,
        teacher_image_embeds: torch.Tensor | None = None,
        teacher_text_embeds: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ) -> CusaLossOutput:
        """The contrastive term + CSA + USA of a batch's embeddings with this model's scalars and loss settings
        (``self.cusa_loss``, which gathers them across processes when ``gather_features`` is on).

        ``forward`` calls it with the embeddings it has just computed; ``CusaTrainer`` with ``loss_chunk_size`` calls it
        with the embeddings of every chunk of a batch, computed without gradient, to cache their gradients.

        Args:
            embeddings: the `(batch_size, dim)` ``image_embeds``, ``text_embeds`` and (with USA heads)
                ``uni_image_embeds``, ``uni_text_embeds`` of ``forward(return_loss=False)``.
            image_ids, teacher_image_embeds, teacher_text_embeds: as in ``forward``.
            **loss_kwargs: ``pair_similarity`` / ``itc_terms`` of backbones that score pairs or bring their own loss
                (see [`CusaLoss`]).
        """
        return self.cusa_loss(
            embeddings.image_embeds,
            embeddings.text_embeds,
            **self.loss_scalars(),
            uni_image_embeds=embeddings.uni_image_embeds,
            uni_text_embeds=embeddings.uni_text_embeds,
            image_ids=image_ids,
            teacher_image_embeds=teacher_image_embeds,
            teacher_text_embeds=teacher_text_embeds,
            **loss_kwargs,
        )

    def _project_cached_tower(self, modality: str, tower_features: torch.Tensor) -> torch.Tensor:
        """The backbone's (trainable) projection of a frozen ``modality`` tower's cached pooled output."""
        adapter = self.adapter
        if not getattr(adapter, f"has_separable_{modality}_tower"):
            raise ValueError(
                f"a {self.config.backbone_config.model_type!r} backbone cannot take {modality}_tower_features: its "
                f"adapter does not split {modality} encoding into a {TOWER_NAMES[modality]} and a projection; pass "
                "the raw inputs"
            )
        if self.training:
            tower = getattr(adapter, f"{modality}_tower")()
            trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(
                    f"{modality}_tower_features skip the {TOWER_NAMES[modality]}, but {len(trainable)} of its parameters are "
                    f"trainable (first: {trainable[0]}); they would silently stop training. Freeze the tower or pass "
                    "the raw inputs"
                )
        expected = getattr(adapter, f"{modality}_tower_dim")
        if tower_features.ndim != 2 or tower_features.shape[1] != expected:
            raise ValueError(
                f"{modality}_tower_features has shape {tuple(tower_features.shape)}; this backbone's {TOWER_NAMES[modality]} "
                f"gives (batch_size, {expected})"
            )
        tower_features = tower_features.to(self.dtype)
        if self.tower_dropout is not None:
            tower_features = self.tower_dropout(tower_features)
        return getattr(adapter, f"project_{modality}_tower")(tower_features)
