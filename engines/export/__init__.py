"""Export and training: building bundles (FetalCLIP, the demo model, the reference bundle), their heads,
int8 quantization and its gate, fp16 conversion, and TensorRT plan building.

Most of it needs the ``export`` extras (torch, open_clip). The cart runtime (the pipeline with the ONNX
Runtime engine) never imports this package; only the torch reference engine (the model it rebuilds) and
the TensorRT engine on a plan-cache miss reach into it.
"""
