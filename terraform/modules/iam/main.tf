# IAM roles for service accounts (IRSA), least privilege:
#   workflow: read datasets, read/write run roots, write (never read or delete) MLflow registry artifacts
#   triton:   read the Triton model repository prefix, nothing else
#   mlflow:   read/write its artifact prefix
# Each role trusts only the cluster's OIDC provider, for exactly one namespace/service account and audience
# sts.amazonaws.com. KMS use is limited to the bucket key, and only through S3 (kms:ViaService).

data "aws_region" "current" {}

locals {
  s3_via_service = "s3.${data.aws_region.current.name}.amazonaws.com"

  service_accounts = {
    workflow = var.workflow_service_account
    triton   = var.triton_service_account
    mlflow   = var.mlflow_service_account
  }

  runs_objects   = "${var.runs_bucket_arn}/${var.runs_prefix}*"
  triton_objects = "${var.models_bucket_arn}/${var.triton_model_prefix}/*"
  mlflow_objects = "${var.models_bucket_arn}/${var.mlflow_artifact_prefix}/*"
}

data "aws_iam_policy_document" "assume" {
  for_each = local.service_accounts

  statement {
    sid     = "EksServiceAccount"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider}:sub"
      values   = ["system:serviceaccount:${each.value.namespace}:${each.value.name}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  for_each = local.service_accounts

  name                 = "${var.name}-${each.key}"
  description          = "IRSA role of ${each.value.namespace}/${each.value.name}"
  assume_role_policy   = data.aws_iam_policy_document.assume[each.key].json
  permissions_boundary = var.permissions_boundary_arn
  max_session_duration = 3600

  tags = merge(var.tags, {
    "defectops.io/service-account" = "${each.value.namespace}/${each.value.name}"
  })
}

# --- permissions ---

data "aws_iam_policy_document" "workflow" {
  statement {
    sid       = "ListDatasets"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [var.datasets_bucket_arn]
  }

  statement {
    sid       = "ReadDatasets"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["${var.datasets_bucket_arn}/*"]
  }

  statement {
    sid       = "ListRunRoots"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [var.runs_bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.runs_prefix, "${var.runs_prefix}*"]
    }
  }

  statement {
    sid       = "ReadWriteRunRoots"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = [local.runs_objects]
  }

  statement {
    sid       = "WriteRegistryArtifacts"
    effect    = "Allow"
    actions   = ["s3:PutObject", "s3:AbortMultipartUpload"]
    resources = [local.mlflow_objects]
  }

  statement {
    sid       = "BucketKeyThroughS3"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = [local.s3_via_service]
    }
  }
}

data "aws_iam_policy_document" "triton" {
  statement {
    sid       = "ListModelRepository"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [var.models_bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.triton_model_prefix, "${var.triton_model_prefix}/*"]
    }
  }

  statement {
    sid       = "ReadModelRepository"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = [local.triton_objects]
  }

  statement {
    sid       = "DecryptThroughS3"
    effect    = "Allow"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = [local.s3_via_service]
    }
  }
}

data "aws_iam_policy_document" "mlflow" {
  statement {
    sid       = "ListArtifactStore"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [var.models_bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.mlflow_artifact_prefix, "${var.mlflow_artifact_prefix}/*"]
    }
  }

  statement {
    sid       = "ReadWriteArtifactStore"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = [local.mlflow_objects]
  }

  statement {
    sid       = "BucketKeyThroughS3"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = [local.s3_via_service]
    }
  }
}

locals {
  policies = {
    workflow = data.aws_iam_policy_document.workflow.json
    triton   = data.aws_iam_policy_document.triton.json
    mlflow   = data.aws_iam_policy_document.mlflow.json
  }
}

resource "aws_iam_role_policy" "this" {
  for_each = aws_iam_role.this

  name   = "s3-access"
  role   = each.value.id
  policy = local.policies[each.key]
}
