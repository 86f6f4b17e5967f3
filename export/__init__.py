"""Export MERT to ONNX for Triton (a script folder; run export/to_onnx.py)."""
