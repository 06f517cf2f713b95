variable "cluster_name" {
  description = "Name of the EKS cluster."
  type        = string

  validation {
    condition     = can(regex("^[a-zA-Z][a-zA-Z0-9-]{0,99}$", var.cluster_name))
    error_message = "cluster_name: a letter, then letters, digits and '-', at most 100 characters."
  }
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the control plane (the Helm chart's floor is 1.29)."
  type        = string
  default     = "1.31"

  validation {
    condition     = can(regex("^1\\.(29|[3-9][0-9])$", var.kubernetes_version))
    error_message = "kubernetes_version must be 1.29 or newer, as `1.<minor>`."
  }
}

variable "vpc_id" {
  description = "VPC the cluster runs in."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the control plane's network interfaces and the node groups (at least two AZs)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "subnet_ids needs at least two subnets (EKS requires two AZs)."
  }
}

variable "endpoint_public_access" {
  description = "Also expose the Kubernetes API endpoint publicly (restricted to endpoint_public_access_cidrs). The private endpoint is always on."
  type        = bool
  default     = false
}

variable "endpoint_public_access_cidrs" {
  description = "CIDR blocks allowed to reach the public API endpoint when endpoint_public_access is true; never 0.0.0.0/0."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.endpoint_public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "endpoint_public_access_cidrs must be valid IPv4 CIDR blocks and must not include 0.0.0.0/0."
  }
}

variable "endpoint_private_access_cidrs" {
  description = "CIDR blocks (e.g. the VPC, a VPN) allowed to reach the private API endpoint on 443 besides the nodes."
  type        = list(string)
  default     = []
}

variable "cluster_log_types" {
  description = "Control-plane log types sent to CloudWatch Logs."
  type        = list(string)
  default     = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  validation {
    condition     = alltrue([for t in var.cluster_log_types : contains(["api", "audit", "authenticator", "controllerManager", "scheduler"], t)])
    error_message = "cluster_log_types may contain only api, audit, authenticator, controllerManager and scheduler."
  }
}

variable "cluster_log_retention_in_days" {
  description = "Days to keep the control-plane logs."
  type        = number
  default     = 365
}

variable "logs_kms_key_arn" {
  description = "KMS key ARN encrypting the control-plane log group (its policy must let CloudWatch Logs use it)."
  type        = string
}

variable "secrets_kms_key_arn" {
  description = "KMS key ARN for envelope encryption of Kubernetes Secrets."
  type        = string
}

variable "authentication_mode" {
  description = "How IAM principals are mapped into the cluster: API (access entries), API_AND_CONFIG_MAP or CONFIG_MAP."
  type        = string
  default     = "API"

  validation {
    condition     = contains(["API", "API_AND_CONFIG_MAP", "CONFIG_MAP"], var.authentication_mode)
    error_message = "authentication_mode must be API, API_AND_CONFIG_MAP or CONFIG_MAP."
  }
}

variable "bootstrap_cluster_creator_admin" {
  description = "Give the identity that creates the cluster cluster-admin through an access entry (needed for a first kubectl unless cluster_admin_principal_arns is set)."
  type        = bool
  default     = true
}

variable "cluster_admin_principal_arns" {
  description = "IAM role/user ARNs granted AmazonEKSClusterAdminPolicy through access entries (authentication_mode API or API_AND_CONFIG_MAP)."
  type        = list(string)
  default     = []
}

variable "system_node_group" {
  description = "The CPU node group for cluster add-ons, the Argo controller, MLflow and the CPU pipeline steps."
  type = object({
    instance_types = list(string)
    capacity_type  = optional(string, "ON_DEMAND")
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = optional(number, 50)
    ami_type       = optional(string, "AL2023_x86_64_STANDARD")
  })
  default = {
    instance_types = ["m6i.large"]
    min_size       = 2
    max_size       = 4
    desired_size   = 2
  }

  validation {
    condition     = var.system_node_group.min_size >= 1 && var.system_node_group.min_size <= var.system_node_group.desired_size && var.system_node_group.desired_size <= var.system_node_group.max_size
    error_message = "system_node_group: need 1 <= min_size <= desired_size <= max_size (the system pool must not scale to zero)."
  }
}

variable "gpu_node_group" {
  description = <<-EOT
    The GPU node group (training steps and Triton). Its nodes carry the label `nvidia.com/gpu.present=true` and the
    taint `nvidia.com/gpu=true:NoSchedule`, which the Triton chart and the Argo train template select and tolerate.
    min_size 0 lets the pool scale to zero when no GPU pod is pending (cluster-autoscaler or Karpenter adds nodes).
  EOT
  type = object({
    instance_types = list(string)
    capacity_type  = optional(string, "ON_DEMAND")
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = optional(number, 200)
    ami_type       = optional(string, "AL2023_x86_64_NVIDIA")
  })
  default = {
    instance_types = ["g5.xlarge", "g5.2xlarge"]
    min_size       = 0
    max_size       = 4
    desired_size   = 0
  }

  validation {
    condition     = var.gpu_node_group.min_size >= 0 && var.gpu_node_group.min_size <= var.gpu_node_group.desired_size && var.gpu_node_group.desired_size <= var.gpu_node_group.max_size && var.gpu_node_group.max_size >= 1
    error_message = "gpu_node_group: need 0 <= min_size <= desired_size <= max_size and max_size >= 1."
  }

  validation {
    condition     = contains(["AL2023_x86_64_NVIDIA", "AL2_x86_64_GPU", "BOTTLEROCKET_x86_64_NVIDIA", "AL2023_ARM_64_NVIDIA", "BOTTLEROCKET_ARM_64_NVIDIA"], var.gpu_node_group.ami_type)
    error_message = "gpu_node_group.ami_type must be an EKS GPU AMI type (AL2023_x86_64_NVIDIA, AL2_x86_64_GPU, BOTTLEROCKET_*_NVIDIA, AL2023_ARM_64_NVIDIA)."
  }
}

variable "gpu_node_labels" {
  description = "Kubernetes labels of the GPU nodes (the serving chart's gpu.nodeSelector must match)."
  type        = map(string)
  default     = { "nvidia.com/gpu.present" = "true" }
}

variable "gpu_node_taint" {
  description = "Taint of the GPU nodes (the chart's and the Argo train template's tolerations must match). effect: NO_SCHEDULE, NO_EXECUTE or PREFER_NO_SCHEDULE."
  type = object({
    key    = string
    value  = string
    effect = string
  })
  default = { key = "nvidia.com/gpu", value = "true", effect = "NO_SCHEDULE" }

  validation {
    condition     = contains(["NO_SCHEDULE", "NO_EXECUTE", "PREFER_NO_SCHEDULE"], var.gpu_node_taint.effect)
    error_message = "gpu_node_taint.effect must be NO_SCHEDULE, NO_EXECUTE or PREFER_NO_SCHEDULE (the EKS API's spelling)."
  }
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
