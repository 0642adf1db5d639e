"""CusaTrainingArguments is a written dataclass whose CUSA fields are exactly CusaConfig's run settings."""

import dataclasses

from cusa_hf.arguments import CusaTrainingArguments, parse_arguments
from cusa_hf.configuration_cusa import RUN, CusaConfig, cusa_field_names


def test_cusa_fields_are_the_run_settings_of_cusa_config_with_its_types_and_defaults():
    own = [spec for spec in dataclasses.fields(CusaTrainingArguments) if spec.metadata.get("help", "").startswith("CusaConfig.")]
    assert tuple(spec.name for spec in own) == cusa_field_names(RUN)
    config_fields = {spec.name: spec for spec in dataclasses.fields(CusaConfig)}
    # Both modules annotate lazily, so the annotations are the written types.
    arguments_hints, config_hints = vars(CusaTrainingArguments)["__annotations__"], vars(CusaConfig)["__annotations__"]
    for spec in own:
        assert spec.default == config_fields[spec.name].default, spec.name
        assert arguments_hints[spec.name] == config_hints[spec.name], spec.name
    defaults = CusaTrainingArguments(output_dir="unused").cusa_config_fields()
    assert defaults == {name: config_fields[name].default for name in cusa_field_names(RUN)}


def test_every_cusa_field_is_a_flag_and_the_baseline_switches_csa_and_usa_off(tmp_path):
    argv = ["--backbone", "openai/clip-vit-base-patch32", "--output_dir", str(tmp_path), "--csa_weight", "0.3",
            "--softlabel_mode", "add", "--cross_projection", "false", "--cusa", "false"]  # fmt: skip
    _, _, args = parse_arguments(argv)
    assert isinstance(args, CusaTrainingArguments)
    assert (args.csa_weight, args.softlabel_mode, args.cross_projection) == (0.3, "add", False)
    assert args.cusa_config_fields()["use_csa"] is False and args.cusa_config_fields(cusa_on=True)["use_csa"] is True
