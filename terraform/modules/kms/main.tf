# A customer-managed KMS key with yearly rotation. The key policy delegates to IAM (the account root), so access is
# granted by the IAM policies of the roles that use the key (modules/iam, the EKS cluster role, S3 through the
# roles' kms:ViaService conditions); CloudWatch Logs is the one service principal it names, and only for the log
# groups it is given.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account_root = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"
}

data "aws_iam_policy_document" "this" {
  # In a key policy, Resource "*" is the key itself, and kms:* for the account root is AWS's default key policy: it
  # hands access control to IAM policies (which name this key's ARN). Checkov reads this document as an IAM policy.
  #checkov:skip=CKV_AWS_109:Key policy: "*" is this key only; the account-root grant delegates to IAM (AWS default key policy).
  #checkov:skip=CKV_AWS_111:Key policy: "*" is this key only; the account-root grant delegates to IAM (AWS default key policy).
  #checkov:skip=CKV_AWS_356:Key policy: "*" is this key only; a key policy cannot name its own key ARN.
  statement {
    sid       = "AccountAdministersKeyThroughIAM"
    effect    = "Allow"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy "*" means this key

    principals {
      type        = "AWS"
      identifiers = [local.account_root]
    }
  }

  dynamic "statement" {
    for_each = length(var.cloudwatch_logs_log_group_arns) > 0 ? [1] : []

    content {
      sid    = "CloudWatchLogsEncryptsListedLogGroups"
      effect = "Allow"
      actions = [
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:ReEncrypt*",
        "kms:GenerateDataKey*",
        "kms:Describe*",
      ]
      resources = ["*"]

      principals {
        type        = "Service"
        identifiers = ["logs.${data.aws_region.current.name}.amazonaws.com"]
      }

      condition {
        test     = "ArnLike"
        variable = "kms:EncryptionContext:aws:logs:arn"
        values   = var.cloudwatch_logs_log_group_arns
      }
    }
  }
}

resource "aws_kms_key" "this" {
  description             = var.description
  deletion_window_in_days = var.deletion_window_in_days
  enable_key_rotation     = true
  rotation_period_in_days = 365
  policy                  = data.aws_iam_policy_document.this.json
  tags                    = var.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.alias}"
  target_key_id = aws_kms_key.this.key_id
}
