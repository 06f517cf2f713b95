"""ONNX export, re-validation of exported artifacts, and the Triton model repository."""
