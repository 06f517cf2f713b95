"""Names of the MLflow tags DefectOps writes on runs and model versions: the registry's contract, typed once.

Why one module: the register and verify steps write them, governance and the review page read them, the drift check
and the CLI filter on them; a name typed differently in one place silently reads ``None``.
"""

from __future__ import annotations

PREFIX = "defectops."

# run tags
RUN_ID = "defectops.run_id"
CONFIG_HASH = "defectops.config_hash"

# model-version tags: lineage and gates (register)
DATASET_FINGERPRINT = "defectops.dataset_fingerprint"
GIT_COMMIT = "defectops.git_commit"
GATES_PASSED = "defectops.gates_passed"
GATES_FAILED = "defectops.gates_failed"
MACRO_RECALL = "defectops.macro_recall"

# review (governance)
REVIEW_STATUS = "defectops.review_status"
REGISTERED_BY = "defectops.registered_by"
AUDIT_PREFIX = "defectops.audit."

# export verification (verify_export)
ONNX_TOP1_AGREEMENT = "defectops.onnx_top1_agreement"
ONNX_MAX_LOGIT_DIFF = "defectops.onnx_max_logit_diff"
ONNX_GATES_PASSED = "defectops.onnx_gates_passed"
EXPORT_VERIFIED = "defectops.export_verified"
INT8_PUBLISHED = "defectops.int8_published"
INT8_MACRO_RECALL_DROP = "defectops.int8_macro_recall_drop"
INT8_REFUSED = "defectops.int8_refused"
INT8_MAX_SCORE_REL_DIFF = "defectops.int8_max_score_rel_diff"  # anomaly models: INT8 vs checkpoint scores
INT8_DECISION_FLIPS = "defectops.int8_decision_flips"  # anomaly models: decisions at the threshold changed
SERVED_PRECISION = "defectops.served_precision"  # fp32 | int8: which export the Triton repository serves
