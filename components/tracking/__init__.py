"""MLflow tracking: where runs go, what they carry, and one clear line when the server is away.

    uri.py       the tracking URI and its credentials, the reachability probe, experiments
    lineage.py   params flattened for MLflow; lineage tags (git, data hashes, library versions)
    runs.py      pipeline and model runs, and the log_* helpers
    datasets.py  each model run's data as MLflow dataset inputs (digest = DVC hash; imports MLflow)

Everything public is importable from here: ``from components.tracking import model_run``.
MLflow is imported inside the functions: importing this package stays cheap.
"""
from components.tracking.lineage import (
                                         MAX_PARAM_CHARS,
                                         data_hash_tags,
                                         dataset_hashes,
                                         dist_version,
                                         flatten,
                                         git_changes,
                                         git_state,
                                         lineage_tags,
                                         local_data_hashes,
                                         lock_hashes,
                                         model_params,
                                         pipeline_params,
)
from components.tracking.runs import (
                                         MAX_TAG_CHARS,
                                         PARAMS_ARTIFACT,
                                         PipelineRun,
                                         log_files,
                                         log_metrics,
                                         log_model_artifacts,
                                         log_parity,
                                         log_summary,
                                         model_run,
                                         pipeline_run,
                                         run_params,
)
from components.tracking.uri import (
                                         DEFAULT_TRIES,
                                         PROBE_TIMEOUT_S,
                                         RETRY_BUDGET_S,
                                         URI_FROM_PARAMS_ENV,
                                         TrackingAuthError,
                                         TrackingError,
                                         TrackingUnavailable,
                                         artifact_root,
                                         check_tracking,
                                         ensure_experiment,
                                         experiment_name,
                                         is_server,
                                         redact,
                                         retries,
                                         strip_userinfo,
                                         tracking_uri,
)

__all__ = [
    # uri
    "DEFAULT_TRIES", "PROBE_TIMEOUT_S", "RETRY_BUDGET_S", "URI_FROM_PARAMS_ENV", "TrackingAuthError",
    "TrackingError", "TrackingUnavailable", "artifact_root", "check_tracking", "ensure_experiment",
    "experiment_name", "is_server", "redact", "retries", "strip_userinfo", "tracking_uri",
    # lineage
    "MAX_PARAM_CHARS", "data_hash_tags", "dataset_hashes", "dist_version", "flatten", "git_changes", "git_state",
    "lineage_tags", "local_data_hashes", "lock_hashes", "model_params", "pipeline_params",
    # runs
    "MAX_TAG_CHARS", "PARAMS_ARTIFACT", "PipelineRun", "log_files", "log_metrics", "log_model_artifacts",
    "log_parity", "log_summary", "model_run", "pipeline_run", "run_params",
]
