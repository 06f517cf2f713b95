# The endpoint comes from the environment: AWS_ENDPOINT_URL (e.g. a moto server) redirects every service; unset, the
# provider talks to AWS. The aws_* variables only matter for emulators and default to real-AWS behaviour.
provider "aws" {
  region = var.region

  skip_credentials_validation = var.aws_skip_credentials_validation
  skip_requesting_account_id  = var.aws_skip_requesting_account_id
  skip_metadata_api_check     = var.aws_skip_metadata_api_check
  s3_use_path_style           = var.aws_s3_use_path_style

  default_tags {
    tags = merge(var.tags, {
      Project     = "defectops"
      Environment = var.name
      ManagedBy   = "terraform"
    })
  }
}
