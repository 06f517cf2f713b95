output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = aws_eks_cluster.this.name
}

output "cluster_arn" {
  description = "ARN of the EKS cluster."
  value       = aws_eks_cluster.this.arn
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA certificate of the API endpoint."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "cluster_security_group_id" {
  description = "Security group EKS created for the control plane and the managed nodes."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "oidc_issuer_url" {
  description = "OIDC issuer URL of the cluster (https://...)."
  value       = aws_eks_cluster.this.identity[0].oidc[0].issuer
}

output "oidc_provider" {
  description = "OIDC issuer without the scheme: the prefix of the `:sub` and `:aud` condition keys in IRSA trust policies."
  value       = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")
}

output "oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider that IRSA roles trust."
  value       = aws_iam_openid_connect_provider.this.arn
}

output "node_role_arn" {
  description = "IAM role of the managed nodes."
  value       = aws_iam_role.node.arn
}

output "node_group_names" {
  description = "Managed node group names by pool (`system`, `gpu`)."
  value       = { for k, ng in aws_eks_node_group.this : k => ng.node_group_name }
}

output "gpu_node_selector" {
  description = "Labels that select the GPU nodes (Helm chart gpu.nodeSelector)."
  value       = var.gpu_node_labels
}

output "gpu_toleration" {
  description = "Kubernetes toleration matching the GPU taint (Helm chart gpu.tolerations, Argo train template)."
  value = {
    key      = var.gpu_node_taint.key
    operator = "Equal"
    value    = var.gpu_node_taint.value
    effect   = local.taint_effect_k8s[var.gpu_node_taint.effect]
  }
}
