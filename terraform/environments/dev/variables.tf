variable "region" {
  description = "AWS region of the environment."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name of the environment: prefix of every resource, and the EKS cluster name."
  type        = string
  default     = "defectops-dev"
}

variable "azs" {
  description = "Availability zones of `region` (at least two) for the subnets and node groups; listed explicitly so the layout never changes when AWS adds a zone."
  type        = list(string)
  default     = ["eu-west-1a", "eu-west-1b"]
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC."
  type        = string
  default     = "10.40.0.0/16"
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all AZs (dev: cheaper; set false for one per AZ)."
  type        = bool
  default     = true
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.31"
}

variable "endpoint_public_access" {
  description = "Expose the Kubernetes API publicly as well, restricted to endpoint_public_access_cidrs."
  type        = bool
  default     = false
}

variable "endpoint_public_access_cidrs" {
  description = "CIDR blocks allowed to reach the public API endpoint (e.g. the office egress /32s)."
  type        = list(string)
  default     = []
}

variable "cluster_admin_principal_arns" {
  description = "IAM principals (e.g. an SSO admin role) given cluster-admin through EKS access entries."
  type        = list(string)
  default     = []
}

variable "system_instance_types" {
  description = "Instance types of the system (CPU) node group."
  type        = list(string)
  default     = ["m6i.large"]
}

variable "system_node_count" {
  description = "Size bounds of the system node group."
  type = object({
    min     = number
    max     = number
    desired = number
  })
  default = { min = 2, max = 4, desired = 2 }
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group (e.g. g5.xlarge: 1x A10G 24 GiB; g6.xlarge: 1x L4)."
  type        = list(string)
  default     = ["g5.xlarge", "g6.xlarge"]
}

variable "gpu_capacity_type" {
  description = "ON_DEMAND or SPOT for the GPU node group (training retries on infrastructure failures, so SPOT is an option)."
  type        = string
  default     = "ON_DEMAND"
}

variable "gpu_node_count" {
  description = "Size bounds of the GPU node group; min 0 scales to zero when no GPU pod is pending."
  type = object({
    min     = number
    max     = number
    desired = number
  })
  default = { min = 0, max = 4, desired = 0 }
}

variable "run_artifacts_expiration_days" {
  description = "Days after which run roots in the runs bucket expire."
  type        = number
  default     = 180
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete non-empty buckets (throw-away environments and tests only)."
  type        = bool
  default     = false
}

variable "kms_deletion_window_in_days" {
  description = "Waiting period before destroyed KMS keys are deleted."
  type        = number
  default     = 30
}

variable "triton_model_prefix" {
  description = "Prefix of the Triton model repository in the models bucket (the chart's modelRepository.prefix)."
  type        = string
  default     = "triton"
}

variable "mlflow_artifact_prefix" {
  description = "Prefix of the MLflow artifact store in the models bucket."
  type        = string
  default     = "mlflow"
}

variable "workflow_service_account" {
  description = "Namespace and name of the Argo workflow pods' service account."
  type = object({
    namespace = string
    name      = string
  })
  default = { namespace = "defectops", name = "defectops-workflow" }
}

variable "triton_service_account" {
  description = "Namespace and name of Triton's service account (`helm install triton ... -n serving` gives serving/triton-triton-serving)."
  type = object({
    namespace = string
    name      = string
  })
  default = { namespace = "serving", name = "triton-triton-serving" }
}

variable "mlflow_service_account" {
  description = "Namespace and name of the MLflow server's service account."
  type = object({
    namespace = string
    name      = string
  })
  default = { namespace = "mlflow", name = "mlflow" }
}

variable "tags" {
  description = "Extra tags on every resource (added to Project/Environment/ManagedBy)."
  type        = map(string)
  default     = {}
}

# Provider settings for AWS API emulators (tests run against moto; terraform/ci/moto.tfvars). Real AWS: leave them.
variable "aws_skip_credentials_validation" {
  description = "Skip the provider's STS credential check (emulators only)."
  type        = bool
  default     = false
}

variable "aws_skip_requesting_account_id" {
  description = "Do not look up the account ID through STS/IAM at provider start (emulators only)."
  type        = bool
  default     = false
}

variable "aws_skip_metadata_api_check" {
  description = "Do not ask the EC2 instance metadata service for credentials (emulators, CI)."
  type        = bool
  default     = false
}

variable "aws_s3_use_path_style" {
  description = "Address S3 buckets as https://endpoint/bucket (emulators) instead of virtual-hosted style."
  type        = bool
  default     = false
}
