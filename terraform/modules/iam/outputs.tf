output "workflow_role_arn" {
  description = "IRSA role of the Argo workflow pods: annotate their service account with `eks.amazonaws.com/role-arn`."
  value       = aws_iam_role.this["workflow"].arn
}

output "triton_role_arn" {
  description = "IRSA role of Triton: the Helm chart's serviceAccount.roleArn."
  value       = aws_iam_role.this["triton"].arn
}

output "mlflow_role_arn" {
  description = "IRSA role of the MLflow tracking server."
  value       = aws_iam_role.this["mlflow"].arn
}

output "role_arns" {
  description = "All IRSA role ARNs by workload (workflow, triton, mlflow)."
  value       = { for k, r in aws_iam_role.this : k => r.arn }
}

output "service_accounts" {
  description = "Namespace and name of the service account each role trusts, by workload."
  value       = local.service_accounts
}
