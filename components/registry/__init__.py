"""MLflow model registry: register ONNX models, the promotion gate, manual promotion, rollback.

Registered model name = model key; aliases challenger, champion, previous-champion (see aliases.py).

    lookup.py      the client, versions by number or alias, aliases read, find/fetch a version
    aliases.py     alias moves under a lock, their history, champion moves, rollback
    register.py    register an ONNX model: signature, example inputs, requirements, parity tags
    promotion.py   the promotion gate (Decision, judge, gate), stale champions, manual promotion
    card.py        the model card of a version; the `genflow models` table
    resolve.py     MODEL@alias / MODEL:version -> the registered version, its export downloaded (sample, serve)

Everything public is importable from here: ``from components.registry import gate``.
"""
from components.errors import RegistryError
from components.registry.aliases import (
                                         LOCK_TIMEOUT_S,
                                         alias_history,
                                         alias_lock,
                                         append_history,
                                         make_champion,
                                         remove_alias,
                                         repair_history,
                                         rollback,
                                         set_alias,
                                         verify_aliases,
)
from components.registry.card import format_table, limits, model_card, models_table
from components.registry.lookup import (
                                         CHALLENGER,
                                         CHAMPION,
                                         EVAL_HASH_TAG,
                                         GATE_DECISION_TAG,
                                         HISTORY_TAG,
                                         METRIC_TAG,
                                         PREVIOUS,
                                         SAMPLE_TIME,
                                         aliases_of,
                                         current_aliases,
                                         fetch_version,
                                         find_version,
                                         fmt_value,
                                         get_version,
                                         metrics_of,
                                         parse_version_ref,
                                         promotion_rule,
                                         registry_client,
                                         require_model,
                                         tag_float,
)
from components.registry.promotion import (
                                         Decision,
                                         gate,
                                         judge,
                                         parity_problem,
                                         promote,
                                         record_decision,
                                         stale_champion,
)
from components.registry.register import (
                                         MAX_DESCRIPTION,
                                         artifact_paths,
                                         complete_registration,
                                         example_inputs,
                                         onnx_signature,
                                         parity_tags,
                                         pip_requirements,
                                         register_model,
                                         register_onnx,
)
from components.registry.resolve import (
                                         DEFAULT_ALIAS,
                                         download_version,
                                         parse_model_spec,
                                         registry_version,
                                         tracking_uri_for,
)

__all__ = [
    "RegistryError",
    # resolve (where a sampled or served model comes from)
    "DEFAULT_ALIAS", "download_version", "parse_model_spec", "registry_version", "tracking_uri_for",
    # lookup
    "CHALLENGER", "CHAMPION", "EVAL_HASH_TAG", "GATE_DECISION_TAG", "HISTORY_TAG", "METRIC_TAG", "PREVIOUS",
    "SAMPLE_TIME",
    "aliases_of", "current_aliases", "fetch_version", "find_version", "fmt_value", "get_version", "metrics_of",
    "parse_version_ref", "promotion_rule", "registry_client", "require_model", "tag_float",
    # aliases
    "LOCK_TIMEOUT_S", "alias_history", "alias_lock", "append_history", "make_champion", "remove_alias",
    "repair_history", "rollback", "set_alias", "verify_aliases",
    # register
    "MAX_DESCRIPTION", "artifact_paths", "complete_registration", "example_inputs",
    "onnx_signature", "parity_tags", "pip_requirements",
    "register_model", "register_onnx",
    # promotion
    "Decision", "gate", "judge", "parity_problem", "promote", "record_decision", "stale_champion",
    # card
    "format_table", "limits", "model_card", "models_table",
]
