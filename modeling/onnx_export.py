"""Export torch modules to ONNX (sessions: modeling.onnx_session, which needs no torch)."""
from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from modeling.onnx_session import open_session  # noqa: F401 - the training side imports it from here too


def export_onnx(module: nn.Module, path: Path, *, image_size: int, output_name: str) -> Path:
    """Write module (images NCHW float32 -> output_name) to path with a dynamic batch axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    tmp_path = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.onnx")  # its own: processes share a cache
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: one self-contained file, about 1 s for efficientnet_lite0.
            torch.onnx.export(
                module, (example,), str(tmp_path), input_names=["images"], output_names=[output_name],
                dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}}, opset_version=17, dynamo=False,
            )
        descriptor = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # on disk before it is named: a power cut must not leave a half model under the real name
        finally:
            os.close(descriptor)
        tmp_path.replace(path)  # atomic: a reader never sees half a model
    except BaseException:
        tmp_path.unlink(missing_ok=True)  # a full disk left half a file behind
        raise
    return path
