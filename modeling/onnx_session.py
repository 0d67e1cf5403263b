"""ONNX Runtime sessions opened the way the model is deployed (CPU, N threads). Without torch: `loop serve` answers
/predict from the ONNX file alone, and importing torch cost its first request 3 s and the process its memory."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def open_session(path: Path, *, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
