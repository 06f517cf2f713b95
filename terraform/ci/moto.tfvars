# Settings for applying environments/dev to a local moto server (tests/test_terraform.py). The endpoint itself comes
# from AWS_ENDPOINT_URL in the environment; these only turn off what an emulator cannot answer.
aws_skip_credentials_validation = true
aws_skip_requesting_account_id  = false
aws_skip_metadata_api_check     = true
aws_s3_use_path_style           = true
force_destroy_buckets           = true
kms_deletion_window_in_days     = 7
