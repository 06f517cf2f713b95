variable "bucket_prefix" {
  description = "Prefix of the bucket names (globally unique, e.g. `defectops-dev-123456789012`); buckets are `<prefix>-datasets`, `-runs`, `-models` and `-access-logs`."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,48}[a-z0-9]$", var.bucket_prefix))
    error_message = "bucket_prefix: 3-50 lower-case letters, digits and '-', starting and ending with a letter or digit."
  }
}

variable "kms_key_arn" {
  description = "KMS key ARN for SSE-KMS default encryption of the datasets, runs and models buckets."
  type        = string
}

variable "runs_prefix" {
  description = "Key prefix of the run roots in the runs bucket (`s3://<runs bucket>/<runs_prefix><run-id>/`), with a trailing slash."
  type        = string
  default     = "runs/"

  validation {
    condition     = endswith(var.runs_prefix, "/") && !startswith(var.runs_prefix, "/")
    error_message = "runs_prefix must end with '/' and must not start with '/'."
  }
}

variable "run_artifacts_expiration_days" {
  description = "Days after which objects under runs_prefix (old run artifacts) expire; registered models live in the models bucket and are kept."
  type        = number
  default     = 180

  validation {
    condition     = var.run_artifacts_expiration_days >= 31
    error_message = "run_artifacts_expiration_days must be at least 31 (objects move to STANDARD_IA after 30 days)."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days a replaced or deleted object version is kept (undo window) in the datasets, runs and models buckets."
  type        = number
  default     = 90
}

variable "abort_incomplete_multipart_upload_days" {
  description = "Days after which incomplete multipart uploads are aborted."
  type        = number
  default     = 7
}

variable "access_log_retention_days" {
  description = "Days to keep S3 server access logs."
  type        = number
  default     = 365
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete non-empty buckets (objects and versions are lost). Keep false outside throw-away environments."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
