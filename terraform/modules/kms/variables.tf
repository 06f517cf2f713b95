variable "alias" {
  description = "Alias of the key, without the `alias/` prefix (e.g. `defectops-dev-s3`)."
  type        = string

  validation {
    condition     = can(regex("^[a-zA-Z0-9/_-]+$", var.alias)) && !startswith(var.alias, "aws/")
    error_message = "alias: letters, digits, '/', '_' and '-' only, and not in the reserved aws/ namespace."
  }
}

variable "description" {
  description = "What the key protects (shown in the KMS console)."
  type        = string
}

variable "deletion_window_in_days" {
  description = "Days between `terraform destroy` (ScheduleKeyDeletion) and the key's deletion; 7 to 30."
  type        = number
  default     = 30

  validation {
    condition     = var.deletion_window_in_days >= 7 && var.deletion_window_in_days <= 30
    error_message = "deletion_window_in_days must be between 7 and 30."
  }
}

variable "cloudwatch_logs_log_group_arns" {
  description = <<-EOT
    Log group ARN patterns (e.g. `arn:aws:logs:eu-west-1:123456789012:log-group:/aws/eks/*`) whose data the CloudWatch
    Logs service may encrypt with this key. Empty: CloudWatch Logs gets no access.
  EOT
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for the key."
  type        = map(string)
  default     = {}
}
