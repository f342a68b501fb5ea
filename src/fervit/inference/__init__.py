"""Inference: faces found in photos, cropped like FER-2013, classified by a saved model (PyTorch or ONNX)."""
