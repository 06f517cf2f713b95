output "bucket_names" {
  description = "Bucket names by role: datasets, runs, models."
  value       = { for k, b in aws_s3_bucket.this : k => b.id }
}

output "bucket_arns" {
  description = "Bucket ARNs by role: datasets, runs, models."
  value       = { for k, b in aws_s3_bucket.this : k => b.arn }
}

output "access_log_bucket_name" {
  description = "Bucket receiving the S3 server access logs (prefix `<bucket role>/`)."
  value       = aws_s3_bucket.logs.id
}

output "runs_prefix" {
  description = "Key prefix of the run roots in the runs bucket."
  value       = var.runs_prefix
}

output "kms_key_arn" {
  description = "KMS key encrypting the datasets, runs and models buckets."
  value       = var.kms_key_arn
}
