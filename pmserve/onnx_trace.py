"""torch.onnx.export as every pmserve graph is written: the TorchScript exporter (dynamo=False: it traces the
models' own attention and mask code, which ONNX Runtime runs everywhere), constant folding, the exporter's
warnings silenced, and a failure as one line that says what was exported; and how every graph file is saved and
moved (`save_graph`, `move_graph`).

Graphs over protobuf's 2 GB limit: a ModelProto cannot be serialised past 2 GB, so a graph whose tensors exceed
EXTERNAL_DATA_BYTES keeps them in ONE external data file beside it, PATH + ".data" (model.onnx.data in a bundle),
which ONNX Runtime resolves relative to the graph's path and the manifest hashes like any other file. The
TorchScript exporter (torch 2.13, dynamo=False) switches to external data on its own past 2 GB, but writes one file
per initializer, named after the tensor, beside the graph (torch/csrc/jit/serialization/export.cpp via
graph._export_onnx(model_file_location=...)); so export_graph traces into a folder of its own and saves the graph
again through save_graph, one rule for every size."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import PMError

# protobuf's limit is 2 GiB for the whole ModelProto; the margin is for the graph's nodes and names (a 7B decoder's
# graph without its weights is a few MB) and for small tensors left inside it (size_threshold)
EXTERNAL_DATA_BYTES = 2**31 - 2**28


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
    """Trace MODULE on ARGS into PATH (save_graph's layout); `what` names the model in the error (e.g. "bert")."""
    import onnx

    tmp = Path(tempfile.mkdtemp(prefix=".trace-", dir=Path(path).parent))
    try:
        trace = tmp / "trace.onnx"
        _export(module, args, trace, inputs, outputs, axes, opset, what)
        one_file = [f.name for f in tmp.iterdir()] == [trace.name]
        if one_file and trace.stat().st_size <= EXTERNAL_DATA_BYTES:  # as save_graph would write it: moved
            data_file(path).unlink(missing_ok=True)
            shutil.move(str(trace), str(path))
        else:  # torch's file per tensor, or past the limit: save_graph's one data file
            save_graph(onnx.load(str(trace)), Path(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(module, args, path: Path, inputs, outputs, axes, opset: int, what: str) -> None:
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


def data_file(path: Path) -> Path:
    """The external data file of the graph at PATH: one file beside it, PATH + ".data"."""
    return Path(path).with_name(Path(path).name + ".data")


def tensor_bytes(model) -> int:
    """Bytes of every tensor in MODEL (initializers and constant attributes, subgraphs included)."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(t.ByteSize() for t in _get_all_tensors(model))


def save_graph(model, path: Path) -> None:
    """Write the ModelProto MODEL (its tensors in memory) to PATH; past EXTERNAL_DATA_BYTES of tensors, every
    tensor of 1 KiB or more goes to data_file(PATH) instead (MODEL's tensors then point there: do not reuse it).
    Any data file of an earlier graph at PATH is removed first (onnx would append to it)."""
    import onnx

    path, data = Path(path), data_file(path)
    data.unlink(missing_ok=True)
    external = tensor_bytes(model) > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    # onnx 1.23 creates the data file owner-only (0600): a server run as another user could not read it
    if data.exists():
        data.chmod(path.stat().st_mode & 0o777)


def move_graph(src: Path, dst: Path) -> None:
    """Move the graph at SRC, with its data file if it has one, to DST (the data file to data_file(DST)): the
    graph's references to its data are rewritten, the tensors are not read."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    src, dst = Path(src), Path(dst)
    if not data_file(src).exists():
        shutil.move(str(src), str(dst))
        return
    model = onnx.load(str(src), load_external_data=False)
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_file(dst).name
    shutil.move(str(data_file(src)), str(data_file(dst)))
    onnx.save_model(model, str(dst))
    src.unlink()
