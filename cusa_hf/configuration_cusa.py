"""CUSA model configuration: a nested backbone config plus the CUSA fields, with the authors' defaults."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

#: Reductions of (soft-)cross-entropy terms (``itc_reduction``).
#: ``"all_entries_mean"`` (the authors' ``contrastive_loss_mode: mean``) averages target-weighted log-probabilities over
#: all B x B entries, i.e. the usual InfoNCE divided by the number of columns; the published CSA/USA weights were tuned
#: against this scale. ``"row_mean"`` is the usual InfoNCE: sum over each row, mean over rows.
REDUCTIONS = ("all_entries_mean", "row_mean")
#: How teacher similarities become CSA's soft labels (``softlabel_mode``, see ``cusa_hf.losses.teacher_soft_labels``).
SOFTLABEL_MODES = ("each", "add", "dot")
#: How a distribution is aligned to its soft labels (``softlabel_loss``, see ``cusa_hf.losses.soft_label_loss``).
SOFTLABEL_LOSSES = ("kl", "contrastive")

#: Backbone families whose adapters (and, for X2-VLM and SGR/SAF, config and model classes) live in the
#: ``cusa_hf.models`` sub-package. ``save_pretrained`` copies into a checkpoint only ``modeling_cusa`` and the modules
#: it imports relatively from its own folder (``backbones``, this one, ``losses``, ``distributed``), so the code saved
#: with a checkpoint knows the CLIP, Chinese-CLIP and dual-encoder adapters of ``backbones``, not these.
PACKAGE_ONLY_MODEL_TYPES = ("blip", "sgraf", "x2vlm")

#: What a CUSA field is for, stated once on the field (its ``roles`` metadata) and read back as the field lists below:
#: a run may set it (``CusaTrainingArguments`` has it as a field and a flag); it shapes the loss (the model card lists
#: it); a checkpoint resumes only into a run that agrees on it (it decides which parameters the model has, what its
#: teacher columns mean, or the loss the run was trained with so far; the temperatures are not among them, as their
#: trained values are the checkpoint's parameters); it shapes the cross-modal projectors (a run that starts from a
#: checkpoint keeps it).
RUN, LOSS, RESUME, PROJECTOR = "run", "loss", "resume", "projector"


def _field(default: Any, *roles: str, bounds: tuple[str, str] | None = None) -> Any:
    """A CUSA field with its roles and, for a learnable temperature, the fields of its clamp bounds."""
    metadata = {"roles": roles} if bounds is None else {"roles": roles, "bounds": bounds}
    return dataclasses.field(default=default, metadata=metadata)


#: Keywords that ``PreTrainedConfig`` itself handles (from ``from_pretrained`` and saved config files).
_BASE_KEYWORDS = {
    "auto_map", "model_type", "name_or_path", "transformers_version", "torch_dtype", "output_attentions",
    "attn_implementation", "experts_implementation", "per_layer_config", "num_labels", "architectures",
    "rope_scaling", "rope_theta",
}  # fmt: skip


def _refuse_unknown_keywords(kwargs: dict[str, Any]) -> None:
    """An unknown keyword (``csa_wieght=0.0``) would become a silently ignored attribute: refuse it, with the
    closest field name."""
    from transformers import GenerationConfig

    allowed = _BASE_KEYWORDS | set(GenerationConfig._get_default_generation_params())
    unknown = [
        key for key in kwargs if key not in allowed and not key.startswith("_") and not key.endswith(("_token_id", "_token_ids"))
    ]  # fmt: skip
    fields = [f.name for f in dataclasses.fields(CusaConfig)]
    hints = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown}
    if "model_type" in kwargs:
        # A saved config.json (to_dict always writes model_type): other libraries may have stored attributes of their
        # own on it (the Trainer aligns token ids, ...), so only near-misses of CUSA's own fields are refused.
        unknown = [key for key in unknown if hints[key]]
    if unknown:
        described = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise ValueError(f"CusaConfig got unknown keyword(s) {described}; see CusaConfig's docstring for its fields")


def package_required_error(model_type: str) -> ImportError:
    """The error for a checkpoint of a :data:`PACKAGE_ONLY_MODEL_TYPES` backbone loaded by its saved code alone
    (``AutoModel.from_pretrained(..., trust_remote_code=True)`` without cusa-hf)."""
    return ImportError(
        f"this CUSA checkpoint's backbone (model_type={model_type!r}) is defined by the cusa-hf package, not by the "
        "code saved with the checkpoint (which covers CLIP, Chinese-CLIP and VisionTextDualEncoder backbones). "
        "Install it (pip install cusa-hf) and load the checkpoint with cusa_hf.CusaModel.from_pretrained(path)"
    )


def _check_backbone_model_type(backbone_config: Any) -> None:
    """A nested backbone dict (as config.json stores it) whose ``model_type`` AutoConfig does not know would fail inside
    transformers with a bare ``KeyError``: name the field, and for the backbones that cusa-hf itself defines (X2-VLM,
    SGR/SAF, loaded by the checkpoint's saved code without the package), what to install."""
    if not isinstance(backbone_config, dict):
        return
    model_type = backbone_config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if model_type in PACKAGE_ONLY_MODEL_TYPES:
        raise package_required_error(model_type)
    described = (
        "no 'model_type'" if model_type is None else f"model_type={model_type!r}, which AutoConfig does not know"
    )
    raise ValueError(
        f"CusaConfig.backbone_config has {described}; give a config object, or a dict whose 'model_type' is a "
        "transformers model type or one registered with AutoConfig.register"
    )


class CusaConfig(PreTrainedConfig):
    r"""Configuration of a [`CusaModel`]: a vision-text backbone wrapped with CUSA's projectors, heads and losses.

    Defaults are the authors' published settings for CLIP ViT-B/32 and ViT-L/14@336 (see ``docs/model.md``).

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            The backbone's configuration (e.g. a `CLIPConfig`), or a dict with a `"model_type"` key. Defaults to a
            default `CLIPConfig`. It is nested and serialised in `config.json`.
        csa_weight (`float`, defaults to 0.1): alpha, the weight of the cross-modal soft-label alignment loss.
        usa_weight (`float`, defaults to 0.5): beta, the weight of the uni-modal soft-label alignment loss.
        use_csa (`bool`, defaults to `True`): switch CSA off (ablation rows / the InfoNCE baseline).
        use_usa (`bool`, defaults to `True`): switch USA off; without it the model has no USA heads.
        itc_temperature (`float`, defaults to 0.05): initial InfoNCE temperature tau, clamped to
            [`itc_temperature_min`=0.01, `itc_temperature_max`=0.10].
        csa_temperature (`float`, defaults to 0.45): initial CSA temperature tau_c (both directions), clamped to
            [`csa_temperature_min`=0.10, `csa_temperature_max`=0.99].
        usa_image_temperature, usa_text_temperature (`float`, defaults to 0.45): initial USA temperatures, clamped
            to [`usa_temperature_min`=0.10, `usa_temperature_max`=1.00].
        itc_loss (`str`, *optional*): the contrastive term beside CSA and USA (`cusa_hf.contrastive_terms`):
            `"infonce"` (multi-positive InfoNCE, the authors') or `"sigmoid"` (SigLIP's pairwise sigmoid loss, with a
            learnable log-scale and bias: the backbone's own `logit_scale` / `logit_bias` when it has them, else
            fresh ones at log 10 and -10). `None` means the backbone's own: `"sigmoid"` for SigLIP and SigLIP 2,
            `"infonce"` otherwise; the model records the resolved value.
        learnable_temperatures (`bool`, defaults to `True`): train the four temperatures (the authors do) and the
            sigmoid term's log-scale and bias.
        softlabel_temperature (`float`, defaults to 1.0): kappa, the frozen temperature of the teacher soft labels.
        softlabel_mode (`str`, defaults to `"each"`): `"each"`, `"add"` or `"dot"` (see `cusa_hf.losses`).
        softlabel_loss (`str`, defaults to `"kl"`): `"kl"` or `"contrastive"` (soft-target cross-entropy).
        itc_reduction (`str`, defaults to `"all_entries_mean"`): the authors' InfoNCE scale (mean over all B x B
            entries) or `"row_mean"` (the usual InfoNCE); see `REDUCTIONS`.
        cross_projection (`bool`, *optional*): add the cross-modal projectors (LayerNorm + Linear) on the backbone's
            pooled features. `None` means: yes, unless the backbone scores pairs itself or trains with its own loss.
        projection_dim (`int`, *optional*): output width of the cross-modal projectors; defaults to the backbone's
            feature width (the authors' d -> d).
        tower_dropout (`float`, defaults to 0.0): dropout on each tower's pooled output before the backbone's
            projection, in training only (backbones with separate towers and projections: CLIP, VisionTextDualEncoder).
            Not part of the authors' method: a regulariser for small data on frozen towers (the built-in default).
        gather_features (`bool`, defaults to `False`): all-gather features across processes so InfoNCE and the soft
            labels see the global batch (the authors compute them per GPU).
        teacher_image_dim, teacher_text_dim (`int`, *optional*): widths of the teacher features the model was trained
            with; recorded by the trainer and checked against the data.
        teacher_info (`dict`, *optional*): provenance of the teacher features (model, revision, pooling, dimension).
    """

    model_type = "cusa"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="clip")}

    backbone_config: PreTrainedConfig | dict | None = None
    csa_weight: float = _field(0.1, RUN, LOSS, RESUME)
    usa_weight: float = _field(0.5, RUN, LOSS, RESUME)
    use_csa: bool = _field(True, RUN, LOSS, RESUME)
    use_usa: bool = _field(True, RUN, LOSS, RESUME)
    itc_loss: str | None = _field(None, RUN, LOSS, RESUME)
    itc_temperature: float = _field(0.05, RUN, LOSS, bounds=("itc_temperature_min", "itc_temperature_max"))
    itc_temperature_min: float = 0.01
    itc_temperature_max: float = 0.10
    csa_temperature: float = _field(0.45, RUN, LOSS, bounds=("csa_temperature_min", "csa_temperature_max"))
    csa_temperature_min: float = 0.10
    csa_temperature_max: float = 0.99
    usa_image_temperature: float = _field(0.45, RUN, LOSS, bounds=("usa_temperature_min", "usa_temperature_max"))
    usa_text_temperature: float = _field(0.45, RUN, LOSS, bounds=("usa_temperature_min", "usa_temperature_max"))
    usa_temperature_min: float = 0.10
    usa_temperature_max: float = 1.00
    learnable_temperatures: bool = _field(True, RUN, RESUME)
    softlabel_temperature: float = _field(1.0, RUN, LOSS, RESUME)
    softlabel_mode: str = _field("each", RUN, LOSS, RESUME)
    softlabel_loss: str = _field("kl", RUN, LOSS, RESUME)
    itc_reduction: str = _field("all_entries_mean", RUN, LOSS, RESUME)
    cross_projection: bool | None = _field(None, RUN, RESUME, PROJECTOR)
    projection_dim: int | None = _field(None, RESUME, PROJECTOR)
    tower_dropout: float = _field(0.0, RUN)
    gather_features: bool = _field(False, RUN, LOSS, RESUME)
    teacher_image_dim: int | None = _field(None, RESUME)
    teacher_text_dim: int | None = _field(None, RESUME)
    teacher_info: dict | None = None

    def __post_init__(self, **kwargs: Any):
        _refuse_unknown_keywords(kwargs)
        _check_backbone_model_type(self.backbone_config)
        super().__post_init__(**kwargs)
        self._validate_cusa_fields()

    def _validate_cusa_fields(self) -> None:
        for name, allowed in (
            ("softlabel_mode", SOFTLABEL_MODES),
            ("softlabel_loss", SOFTLABEL_LOSSES),
            ("itc_reduction", REDUCTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"CusaConfig.{name}={getattr(self, name)!r} is not supported; allowed: {list(allowed)}")
        if self.itc_loss is not None and not isinstance(self.itc_loss, str):
            raise ValueError(f"CusaConfig.itc_loss must be the name of a contrastive term, got {self.itc_loss!r}")
        for name in BOOLEAN_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"CusaConfig.{name} must be True or False, got {getattr(self, name)!r} (a string such as 'no' "
                    "would count as true)"
                )
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CusaConfig.{name} must be a finite number, got {value!r}")
        for name in ("csa_weight", "usa_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"CusaConfig.{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.softlabel_temperature <= 0:
            raise ValueError(f"CusaConfig.softlabel_temperature must be > 0, got {self.softlabel_temperature!r}")
        for value_name, min_name, max_name in TEMPERATURE_FIELDS:
            value, low, high = getattr(self, value_name), getattr(self, min_name), getattr(self, max_name)
            if not 0 < low <= high:
                raise ValueError(
                    f"CusaConfig.{min_name}={low!r} and {max_name}={high!r} must satisfy 0 < {min_name} <= {max_name}"
                )
            if not low <= value <= high:
                raise ValueError(
                    f"CusaConfig.{value_name}={value!r} lies outside its clamp range [{min_name}={low}, {max_name}={high}]"
                )
        if not isinstance(self.tower_dropout, (int, float)) or not 0 <= self.tower_dropout < 1:
            raise ValueError(f"CusaConfig.tower_dropout must be a number in [0, 1), got {self.tower_dropout!r}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"CusaConfig.projection_dim must be a positive integer, got {self.projection_dim!r}")

    @property
    def csa_active(self) -> bool:
        """CSA contributes to the loss (:func:`loss_term_active`)."""
        return loss_term_active(self.use_csa, self.csa_weight)

    @property
    def usa_active(self) -> bool:
        """USA contributes to the loss (:func:`loss_term_active`)."""
        return loss_term_active(self.use_usa, self.usa_weight)

    @property
    def needs_teachers(self) -> bool:
        return self.csa_active or self.usa_active

    def to_dict(self) -> dict[str, Any]:
        """``PreTrainedConfig.to_dict``; saved beside the model's code (``auto_map`` naming ``modeling_cusa``), the
        config's ``auto_map`` entry names ``modeling_cusa.CusaConfig`` (this class, as that module imports it).

        transformers caches remote code per content of the file a class is loaded from, and picks the model class
        registered for the config class. Loaded from ``configuration_cusa.py``, the config class of two checkpoints
        whose ``configuration_cusa.py`` is the same would be one class even when their modeling code differs, and the
        second checkpoint would run the first one's ``modeling_cusa.py``. Loaded through ``modeling_cusa``, whose
        cache entry covers every module it imports, each checkpoint's config class comes with its own code."""
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and str(auto_map.get("AutoModel", "")).startswith("modeling_cusa."):
            output["auto_map"] = {**auto_map, "AutoConfig": "modeling_cusa.CusaConfig"}
        return output


def loss_term_active(switched_on: bool, weight: float) -> bool:
    """Whether a CSA or USA term contributes to the loss: switched on (``use_csa`` / ``use_usa``) and weighted above
    0. ``CusaConfig`` and ``CusaLoss`` both decide it here."""
    return bool(switched_on) and weight > 0


def cusa_field_names(role: str) -> tuple[str, ...]:
    """The names of the CusaConfig fields that have ``role`` (:data:`RUN`, :data:`LOSS`, :data:`RESUME`,
    :data:`PROJECTOR`), in declaration order."""
    return tuple(spec.name for spec in dataclasses.fields(CusaConfig) if role in spec.metadata.get("roles", ()))


_OWN_FIELDS = [spec for spec in dataclasses.fields(CusaConfig) if spec.name in vars(CusaConfig)["__annotations__"]]
#: (initial value field, min field, max field) of every learnable temperature.
TEMPERATURE_FIELDS = tuple((spec.name, *spec.metadata["bounds"]) for spec in _OWN_FIELDS if "bounds" in spec.metadata)
#: Fields that must be real booleans (a string like "no" is truthy) or finite numbers (NaN / inf make the loss NaN):
#: those whose default is a bool, or a float.
BOOLEAN_FIELDS = tuple(spec.name for spec in _OWN_FIELDS if type(spec.default) is bool)
NUMBER_FIELDS = tuple(spec.name for spec in _OWN_FIELDS if type(spec.default) is float)
