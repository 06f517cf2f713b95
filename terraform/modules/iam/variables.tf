variable "name" {
  description = "Prefix of the role names (e.g. `defectops-dev` gives `defectops-dev-workflow`, `-triton`, `-mlflow`)."
  type        = string
}

variable "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider (eks module output oidc_provider_arn)."
  type        = string
}

variable "oidc_provider" {
  description = "OIDC issuer without `https://` (eks module output oidc_provider): prefix of the `:sub` / `:aud` condition keys."
  type        = string

  validation {
    condition     = !startswith(var.oidc_provider, "https://")
    error_message = "oidc_provider must not include the https:// scheme."
  }
}

variable "kms_key_arn" {
  description = "KMS key encrypting the buckets; roles may use it only through S3 (kms:ViaService)."
  type        = string
}

variable "datasets_bucket_arn" {
  description = "ARN of the datasets bucket (workflow pods read it)."
  type        = string
}

variable "runs_bucket_arn" {
  description = "ARN of the runs bucket (workflow pods read and write run roots under runs_prefix)."
  type        = string
}

variable "runs_prefix" {
  description = "Key prefix of the run roots in the runs bucket, with a trailing slash."
  type        = string
  default     = "runs/"

  validation {
    condition     = endswith(var.runs_prefix, "/") && !startswith(var.runs_prefix, "/")
    error_message = "runs_prefix must end with '/' and must not start with '/'."
  }
}

variable "models_bucket_arn" {
  description = "ARN of the models bucket (Triton repository and MLflow artifacts)."
  type        = string
}

variable "triton_model_prefix" {
  description = "Prefix of the Triton model repository in the models bucket, no leading or trailing slash (the chart's modelRepository.prefix)."
  type        = string
  default     = "triton"

  validation {
    condition     = var.triton_model_prefix != "" && !startswith(var.triton_model_prefix, "/") && !endswith(var.triton_model_prefix, "/")
    error_message = "triton_model_prefix must be non-empty, without a leading or trailing slash."
  }
}

variable "mlflow_artifact_prefix" {
  description = "Prefix of the MLflow artifact store in the models bucket, no leading or trailing slash (`mlflow server --artifacts-destination s3://<models bucket>/<prefix>`)."
  type        = string
  default     = "mlflow"

  validation {
    condition     = var.mlflow_artifact_prefix != "" && !startswith(var.mlflow_artifact_prefix, "/") && !endswith(var.mlflow_artifact_prefix, "/")
    error_message = "mlflow_artifact_prefix must be non-empty, without a leading or trailing slash."
  }
}

variable "workflow_service_account" {
  description = "Kubernetes service account of the Argo workflow pods (the pipeline steps)."
  type = object({
    namespace = string
    name      = string
  })
  default = { namespace = "defectops", name = "defectops-workflow" }
}

variable "triton_service_account" {
  description = "Kubernetes service account of Triton (the chart's `<release>-triton-serving`, or serviceAccount.name)."
  type = object({
    namespace = string
    name      = string
  })
  default = { namespace = "serving", name = "triton-triton-serving" }
}

variable "mlflow_service_account" {
  description = "Kubernetes service account of the MLflow tracking server."
  type = object({
    namespace = string
    name      = string
  })
  default = { namespace = "mlflow", name = "mlflow" }
}

variable "permissions_boundary_arn" {
  description = "Optional permissions boundary for every role (null for none)."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for every role."
  type        = map(string)
  default     = {}
}
