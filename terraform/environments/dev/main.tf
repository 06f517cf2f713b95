# The dev environment: network -> KMS keys -> storage -> EKS (+ OIDC provider) -> IRSA roles.
# Remote state: add a backend "s3" block (see docs/terraform.md); without one, state is local.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  log_groups = "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group"
}

module "network" {
  source = "../../modules/network"

  name                 = var.name
  cidr_block           = var.vpc_cidr
  azs                  = var.azs
  single_nat_gateway   = var.single_nat_gateway
  cluster_name         = var.name
  flow_log_kms_key_arn = module.kms_logs.key_arn
}

module "kms_logs" {
  source = "../../modules/kms"

  alias                   = "${var.name}-logs"
  description             = "${var.name}: CloudWatch Logs (VPC flow logs, EKS control-plane logs)"
  deletion_window_in_days = var.kms_deletion_window_in_days
  cloudwatch_logs_log_group_arns = [
    "${local.log_groups}:/aws/vpc/${var.name}/*",
    "${local.log_groups}:/aws/eks/${var.name}/*",
  ]
}

module "kms_eks" {
  source = "../../modules/kms"

  alias                   = "${var.name}-eks-secrets"
  description             = "${var.name}: envelope encryption of Kubernetes Secrets"
  deletion_window_in_days = var.kms_deletion_window_in_days
}

module "kms_s3" {
  source = "../../modules/kms"

  alias                   = "${var.name}-s3"
  description             = "${var.name}: SSE-KMS of the datasets, runs and models buckets"
  deletion_window_in_days = var.kms_deletion_window_in_days
}

module "storage" {
  source = "../../modules/storage"

  bucket_prefix                 = "${var.name}-${local.account_id}"
  kms_key_arn                   = module.kms_s3.key_arn
  run_artifacts_expiration_days = var.run_artifacts_expiration_days
  force_destroy                 = var.force_destroy_buckets
}

module "eks" {
  source = "../../modules/eks"

  cluster_name                  = var.name
  kubernetes_version            = var.kubernetes_version
  vpc_id                        = module.network.vpc_id
  subnet_ids                    = module.network.private_subnet_ids
  endpoint_public_access        = var.endpoint_public_access
  endpoint_public_access_cidrs  = var.endpoint_public_access_cidrs
  endpoint_private_access_cidrs = [module.network.vpc_cidr_block]
  secrets_kms_key_arn           = module.kms_eks.key_arn
  logs_kms_key_arn              = module.kms_logs.key_arn
  cluster_admin_principal_arns  = var.cluster_admin_principal_arns

  system_node_group = {
    instance_types = var.system_instance_types
    min_size       = var.system_node_count.min
    max_size       = var.system_node_count.max
    desired_size   = var.system_node_count.desired
  }

  gpu_node_group = {
    instance_types = var.gpu_instance_types
    capacity_type  = var.gpu_capacity_type
    min_size       = var.gpu_node_count.min
    max_size       = var.gpu_node_count.max
    desired_size   = var.gpu_node_count.desired
  }
}

module "iam" {
  source = "../../modules/iam"

  name                     = var.name
  oidc_provider_arn        = module.eks.oidc_provider_arn
  oidc_provider            = module.eks.oidc_provider
  kms_key_arn              = module.kms_s3.key_arn
  datasets_bucket_arn      = module.storage.bucket_arns["datasets"]
  runs_bucket_arn          = module.storage.bucket_arns["runs"]
  runs_prefix              = module.storage.runs_prefix
  models_bucket_arn        = module.storage.bucket_arns["models"]
  triton_model_prefix      = var.triton_model_prefix
  mlflow_artifact_prefix   = var.mlflow_artifact_prefix
  workflow_service_account = var.workflow_service_account
  triton_service_account   = var.triton_service_account
  mlflow_service_account   = var.mlflow_service_account
}
