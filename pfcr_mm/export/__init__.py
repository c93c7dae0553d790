"""Deployable integer models: ONNX export of a quantized model (pure torch and onnx; no
OpenMMLab import) and the onnxruntime side that runs and inspects it."""

from .onnx_export import export_onnx, integer_model, uniform_post_softmax

__all__ = ["export_onnx", "integer_model", "uniform_post_softmax"]
