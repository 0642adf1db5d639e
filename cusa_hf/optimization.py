"""Optimiser parameter groups with their own learning rates (``learning_rate_mapping``).

Fine-tuning a pretrained, already aligned model with CUSA adds parts that start from scratch (the USA heads, the CSA
temperature) beside weights that should move slowly. ``learning_rate_mapping`` maps regular expressions over
parameter names to learning rates, as sentence-transformers' training arguments do; every other parameter keeps the
run's ``learning_rate``. The scheduler scales every group by the same factor, so each group follows the run's warm-up
and decay from its own peak.

Example::

    >>> groups = parameter_groups(model, {r"^usa_|^csa_temperature$": 1e-3}, learning_rate=5e-5,
    ...                           weight_decay=1e-4, decay_parameter_names=trainer.get_decay_parameter_names(model))
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Iterable

from torch import nn

logger = logging.getLogger(__name__)


def check_learning_rate_mapping(mapping: Any) -> dict[str, float]:
    """``mapping`` as ``{pattern: learning rate}``, each pattern a valid regular expression and each rate a finite
    number > 0; a clear error naming the entry otherwise."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(
            f"learning_rate_mapping must map parameter-name patterns to learning rates (a dict, or its JSON text), "
            f"got {type(mapping).__name__} {mapping!r}"
        )
    checked = {}
    for pattern, rate in mapping.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"learning_rate_mapping pattern {pattern!r} is not a regular expression ({error})") from None
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"learning_rate_mapping[{pattern!r}] must be a finite number > 0, got {rate!r}")
        checked[pattern] = float(rate)
    return checked


def unmatched_patterns(model: nn.Module, learning_rate_mapping: dict[str, float]) -> list[str]:
    """The patterns of ``learning_rate_mapping``, in its order, that match (``re.search``) no trainable parameter
    name of ``model``."""
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    return [
        pattern
        for pattern in check_learning_rate_mapping(learning_rate_mapping)
        if not any(re.search(pattern, name) for name in names)
    ]


def parameter_groups(
    model: nn.Module,
    learning_rate_mapping: dict[str, float],
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
) -> list[dict[str, Any]]:
    """Optimiser groups of ``model``'s trainable parameters: each parameter takes the rate of the first pattern of
    ``learning_rate_mapping`` that its name matches (``re.search``), else ``learning_rate``; weight decay only on
    ``decay_parameter_names`` (the Trainer's choice: no decay on biases and norms). A pattern that matches no trainable
    parameter is refused: a typo would otherwise leave the intended parts at the base rate without a word."""
    mapping = check_learning_rate_mapping(learning_rate_mapping)
    unmatched = unmatched_patterns(model, mapping)
    if unmatched:
        trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        raise ValueError(
            f"learning_rate_mapping pattern(s) {unmatched} match no trainable parameter of the model (trainable: "
            f"{', '.join(trainable[:8])}{', ...' if len(trainable) > 8 else ''})"
        )
    decay_names = set(decay_parameter_names)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    winner: dict[str, str] = {}  # parameter name -> the pattern that gives it its rate
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            pattern = next((pattern for pattern in mapping if re.search(pattern, name)), None)
            if pattern is not None:
                winner[name] = pattern
            groups.setdefault((mapping.get(pattern, learning_rate), name in decay_names), []).append(parameter)
    for pattern in set(mapping) - set(winner.values()):  # matches trainable parameters (checked above), all taken
        earlier = list(dict.fromkeys(other for name, other in winner.items() if re.search(pattern, name)))
        logger.warning(
            "learning_rate_mapping pattern %r (rate %g) never applies: every parameter it matches is matched first by "
            "%s, and the first matching pattern wins. Reorder the patterns or narrow the earlier one",
            pattern, mapping[pattern], ", ".join(repr(other) for other in earlier),
        )  # fmt: skip
    return [
        {"params": params, "lr": rate, "weight_decay": weight_decay if decays else 0.0}
        for (rate, decays), params in groups.items()
    ]
