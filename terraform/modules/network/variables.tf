variable "name" {
  description = "Name prefix of every resource (e.g. `defectops-dev`)."
  type        = string
}

variable "cidr_block" {
  description = "IPv4 CIDR block of the VPC (/16 to /20)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.cidr_block, 0)) && tonumber(split("/", var.cidr_block)[1]) >= 16 && tonumber(split("/", var.cidr_block)[1]) <= 20
    error_message = "cidr_block must be a valid IPv4 CIDR between /16 and /20."
  }
}

variable "azs" {
  description = "Availability zones to spread the subnets over (at least two), e.g. [\"eu-west-1a\", \"eu-west-1b\"]."
  type        = list(string)

  validation {
    condition     = length(var.azs) >= 2 && length(distinct(var.azs)) == length(var.azs)
    error_message = "azs must name at least two distinct availability zones."
  }
}

variable "private_subnet_newbits" {
  description = "Bits added to the VPC prefix for each private (node) subnet: /16 + 3 = /19, 8190 addresses for nodes and pods."
  type        = number
  default     = 3
}

variable "public_subnet_newbits" {
  description = "Bits added to the VPC prefix for each public (load balancer) subnet: /16 + 8 = /24."
  type        = number
  default     = 8
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all AZs (cheaper, not zone-redundant) instead of one per AZ."
  type        = bool
  default     = false
}

variable "cluster_name" {
  description = "EKS cluster name for the `kubernetes.io/cluster/<name>` subnet tags (load balancer discovery); \"\" for none."
  type        = string
  default     = ""
}

variable "flow_log_retention_in_days" {
  description = "Days to keep VPC flow logs in CloudWatch Logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_in_days)
    error_message = "flow_log_retention_in_days must be a CloudWatch Logs retention value (1, 3, 5, 7, 14, 30, ..., 365, 400, ...)."
  }
}

variable "flow_log_kms_key_arn" {
  description = "KMS key ARN encrypting the flow log group (its policy must let CloudWatch Logs use it for this group)."
  type        = string
}

variable "flow_log_traffic_type" {
  description = "Traffic the flow logs capture: ACCEPT, REJECT or ALL."
  type        = string
  default     = "ALL"

  validation {
    condition     = contains(["ACCEPT", "REJECT", "ALL"], var.flow_log_traffic_type)
    error_message = "flow_log_traffic_type must be ACCEPT, REJECT or ALL."
  }
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
