"""torch.onnx.export as every pmserve graph is written: the TorchScript exporter (dynamo=False: it traces the
models' own attention and mask code, which ONNX Runtime runs everywhere), constant folding, the exporter's
warnings silenced, and a failure as one line that says what was exported."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import PMError


def export_graph(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict,
    opset: int,
    what: str,
) -> None:
    """Trace MODULE on ARGS into PATH; `what` names the model in the error (e.g. "bert")."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
        except Exception as e:  # noqa: BLE001 -- the exporter raises many types; the user needs the first line
            raise PMError(
                f"ONNX export of {what} failed at opset {opset} ({str(e).splitlines()[0][:200]})"
            ) from None
