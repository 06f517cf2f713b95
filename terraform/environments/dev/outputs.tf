output "region" {
  description = "AWS region of the environment."
  value       = var.region
}

output "cluster_name" {
  description = "EKS cluster name (`aws eks update-kubeconfig --name <cluster_name> --region <region>`)."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = module.eks.cluster_endpoint
}

output "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster (trusted by the IRSA roles)."
  value       = module.eks.oidc_provider_arn
}

output "node_group_names" {
  description = "Managed node groups by pool."
  value       = module.eks.node_group_names
}

output "bucket_names" {
  description = "Bucket names by role (datasets, runs, models)."
  value       = module.storage.bucket_names
}

output "access_log_bucket_name" {
  description = "Bucket receiving S3 server access logs."
  value       = module.storage.access_log_bucket_name
}

output "s3_kms_key_arn" {
  description = "KMS key of the buckets (SSE-KMS)."
  value       = module.kms_s3.key_arn
}

output "runs_root_uri" {
  description = "Base URI of run roots (`defectops submit` / Argo: --run-root <runs_root_uri><run-id>/)."
  value       = "s3://${module.storage.bucket_names["runs"]}/${module.storage.runs_prefix}"
}

output "datasets_uri" {
  description = "Base URI for dataset snapshots (`defectops data push <dir> <datasets_uri><name>`)."
  value       = "s3://${module.storage.bucket_names["datasets"]}/"
}

output "triton_model_repository_uri" {
  description = "Where `defectops serve publish --to` publishes and Triton reads."
  value       = "s3://${module.storage.bucket_names["models"]}/${var.triton_model_prefix}"
}

output "mlflow_artifacts_uri" {
  description = "MLflow server artifact store (`mlflow server --artifacts-destination <mlflow_artifacts_uri>`)."
  value       = "s3://${module.storage.bucket_names["models"]}/${var.mlflow_artifact_prefix}"
}

output "workflow_role_arn" {
  description = "IRSA role of the Argo workflow pods (service account annotation eks.amazonaws.com/role-arn)."
  value       = module.iam.workflow_role_arn
}

output "triton_role_arn" {
  description = "IRSA role of Triton (Helm chart serviceAccount.roleArn)."
  value       = module.iam.triton_role_arn
}

output "mlflow_role_arn" {
  description = "IRSA role of the MLflow server."
  value       = module.iam.mlflow_role_arn
}

output "triton_helm_values" {
  description = "Values for deploy/helm/triton-serving (`terraform output -json triton_helm_values > tf-values.json; helm ... -f tf-values.json`)."
  value = {
    modelRepository = {
      bucket = module.storage.bucket_names["models"]
      prefix = var.triton_model_prefix
      region = var.region
    }
    serviceAccount = {
      create  = true
      name    = var.triton_service_account.name
      roleArn = module.iam.triton_role_arn
    }
    gpu = {
      nodeSelector = module.eks.gpu_node_selector
      tolerations  = [module.eks.gpu_toleration]
    }
  }
}

output "service_accounts" {
  description = "ServiceAccount manifests carrying the IRSA annotations (workflow for Argo, mlflow); apply with kubectl. Triton's comes from the chart."
  value = {
    for k in ["workflow", "mlflow"] : k => {
      apiVersion = "v1"
      kind       = "ServiceAccount"
      metadata = {
        name      = module.iam.service_accounts[k].name
        namespace = module.iam.service_accounts[k].namespace
        annotations = {
          "eks.amazonaws.com/role-arn"               = module.iam.role_arns[k]
          "eks.amazonaws.com/sts-regional-endpoints" = "true"
        }
      }
    }
  }
}
