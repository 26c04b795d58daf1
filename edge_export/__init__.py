"""Edge export: a merged base model + federated adapter, compiled for on-device runtimes.

pipeline.py           the linear pipeline (load, merge, export, lower, serialise, parity),
                      ExportOptions, the Runner/ExportFormat protocols, the format registry
executorch_export.py  ``pte``: ExecuTorch program with a KV cache (XNNPACK, portable, Core ML, QNN)
onnx_export.py        ``onnx``: ONNX graph for ONNX Runtime inference
ort_training.py       ``ort-training``: ONNX Runtime on-device training artifacts (LoRA trainable)
ort_trainer.py        running those artifacts on a device; the ORT-vs-PyTorch step benchmark
gguf_export.py        ``gguf``: llama.cpp layout, loadable by transformers
parity.py             the parity check against eager PyTorch (parity.json)
errors.py             ExportError, RunnerUnavailable

Importing this package imports nothing heavy; each format loads its toolchain when used.
"""
