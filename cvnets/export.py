"""Writing a trained model as TorchScript or ONNX, running the artifact, and checking parity.

TorchScript goes through torch.jit.trace, as torch.jit.script cannot compile the attention's
shape unpacking; an eval-mode model has no data-dependent branches a trace could miss. A
traced model keeps the spatial size it was traced at (MobileViT's patch layout is computed in
Python), but not the batch size.

ONNX goes through the torch.export-based exporter (torch.onnx.export(dynamo=True), the
default since torch 2.9; it needs onnxscript). The older TorchScript-based exporter is
deprecated and bakes every shape computed in Python into the graph, so it cannot give
MobileViT a symbolic height and width; torch.export keeps them symbolic. One more step
makes a dynamic-shape graph correct for every size: `make_any_size` (MobileViTBlock's
`always_resize`).

The export.* settings are checked by the schema (options/schema.py, ExportConfig). A missing
optional package raises MissingExtraError, an artifact that does not reproduce the model
ParityError; the entry point turns both into a one-line error.
"""
from __future__ import annotations

import importlib
import io
import platform
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvnets.mobilevit import MobileViTBlock
from options.schema import MIN_ONNX_OPSET

INPUT_NAME, OUTPUT_NAME = "images", "logits"
MIN_DYNAMIC_SIDE = 32  # smallest height/width a dynamic-shape ONNX graph accepts (the 32x downsampling)
TRACE_SIDE = 128  # dynamic-shape tracing size: 4x4 maps after 32x downsampling, 4 patches of 2x2
EXTRA_HINT = "pip install -e '.[export]'"
JIT_DEPRECATION = r"`torch\.jit\."  # start of torch 2.14's "`torch.jit.trace` is deprecated" notices

Runner = Callable[[Tensor], Tensor]  # images [B, 3, H, W] -> logits [B, C], on the CPU


class MissingExtraError(Exception):
    """An optional package (of the export or pretrained extra) is not installed (one line, names the fix)."""


class ParityError(Exception):
    """The exported model's logits differ from the checkpoint model's beyond the tolerance."""


# ----------------------------------------------------------------------------- optional packages
def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def require_onnx(export: bool, run: bool) -> None:
    """Raise MissingExtraError unless the packages to export (onnx, onnxscript) and/or to run
    (onnxruntime) ONNX models import."""
    needed = (["onnx", "onnxscript"] if export else []) + (["onnxruntime"] if run else [])
    missing = [name for name in needed if not _importable(name)]
    if missing:
        task = " and ".join(t for t, wanted in (("export", export), ("run", run)) if wanted)
        raise MissingExtraError(f"{', '.join(missing)} not installed (needed to {task} ONNX models); "
                                f"install the export extra: {EXTRA_HINT}")


def package_versions() -> Dict[str, Optional[str]]:
    """Versions of the packages an artifact depends on (None where not installed)."""
    found: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "onnx", "onnxscript", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ----------------------------------------------------------------------------- dynamic shapes
def make_any_size(model: nn.Module) -> int:
    """Make every MobileViTBlock of `model` (in place) resize to whole patches at every input
    size, so that one dynamic-shape graph serves all sizes; the number of blocks."""
    blocks = [m for m in model.modules() if isinstance(m, MobileViTBlock)]
    for block in blocks:
        block.always_resize = True
    return len(blocks)


# ----------------------------------------------------------------------------- making artifacts
# Artifacts are made in memory and written by the caller (atomically, through utils.files):
# torch's own file writers abort the process when the disk fills under them.
def export_torchscript(model: nn.Module, example: Tensor) -> bytes:
    """Trace `model` (eval mode) on `example`; the saved TorchScript module's bytes."""
    with warnings.catch_warnings():
        # TracerWarnings flag the shape arithmetic that tracing turns into constants (the
        # reason the spatial size is fixed); torch 2.14 also marks torch.jit as deprecated.
        # Neither is actionable here, and the parity check runs the saved artifact.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", JIT_DEPRECATION, FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def export_onnx(model: nn.Module, example: Tensor, opset: int, dynamic_batch: bool, dynamic_shape: bool) -> bytes:
    """Export `model` with the torch.export-based exporter; the bytes of one self-contained .onnx
    file (weights inside: one artifact)."""
    require_onnx(export=True, run=False)
    example = _trace_example(example, dynamic_batch, dynamic_shape)
    Dim = torch.export.Dim
    axes: Dict[int, object] = {}
    if dynamic_batch:
        axes[0] = Dim("batch", min=1)
    if dynamic_shape:
        axes[2], axes[3] = Dim("height", min=MIN_DYNAMIC_SIDE), Dim("width", min=MIN_DYNAMIC_SIDE)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=(axes,) if axes else None, verbose=False,
        )
    return program.model_proto.SerializeToString()


def _trace_example(example: Tensor, dynamic_batch: bool, dynamic_shape: bool) -> Tensor:
    """An input on which no dynamic axis has size 0 or 1 anywhere inside the network.

    torch.export specialises such sizes, and torch.onnx then writes a graph that holds for
    them only: traced at batch 1 MobileViT's convolutions fix the batch, and at 64 px its last
    stage has one 2x2 patch per image, which fixes the token count to 1 (the graph fails at
    96 px). The parity check catches both; this avoids them.
    """
    batch, channels, height, width = example.shape
    if dynamic_batch:
        batch = max(batch, 2)
    if dynamic_shape:
        height, width = max(height, TRACE_SIDE), max(width, TRACE_SIDE)
    return torch.rand(batch, channels, height, width)


def export_model(model: nn.Module, example: Tensor, fmt: str, opset: int = MIN_ONNX_OPSET,
                 dynamic_batch: bool = False, dynamic_shape: bool = False) -> bytes:
    """`model` (eval mode, BN folded) as an artifact of `fmt`, in memory; settings as the schema's
    ExportConfig accepts."""
    if fmt == "torchscript":
        return export_torchscript(model, example)
    return export_onnx(model, example, opset, dynamic_batch, dynamic_shape)


# ----------------------------------------------------------------------------- running artifacts
def load_runner(artifact: Union[str, bytes], fmt: str, threads: Optional[int] = None) -> Runner:
    """A function running the artifact (a file's path, or its bytes) on CPU float32 images; returns logits."""
    if fmt == "torchscript":
        source = io.BytesIO(artifact) if isinstance(artifact, bytes) else artifact
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", JIT_DEPRECATION, FutureWarning)
            module = torch.jit.load(source, map_location="cpu").eval()
        return module
    require_onnx(export=False, run=True)
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(artifact, options, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.contiguous().numpy()})[0])

    return run


# ----------------------------------------------------------------------------- parity
@dataclass(frozen=True)
class ParityCase:
    """Images fed to both models in chunks of `batch` (the image count is a multiple of it)."""

    name: str
    images: Tensor  # [N, 3, H, W], preprocessed as the model expects
    batch: int


@dataclass(frozen=True)
class ParityResult:
    name: str
    batch: int
    height: int
    width: int
    count: int
    max_abs_diff: float
    max_abs_logit: float  # of the reference model: the scale float32 rounding grows with
    top1_agree: int

    @property
    def top1_agreement(self) -> float:
        return 100.0 * self.top1_agree / self.count

    def within(self, tolerance: float) -> bool:
        """|diff| <= tolerance, relative to the largest |logit| where that exceeds 1."""
        return self.max_abs_diff <= tolerance * max(1.0, self.max_abs_logit)

    def describe(self) -> str:
        return (f"{self.name}: {self.count} images {self.height}x{self.width} in batches of {self.batch}: "
                f"max |logit diff| {self.max_abs_diff:.2e} (largest |logit| {self.max_abs_logit:.3g}), "
                f"top-1 agreement {self.top1_agree}/{self.count} ({self.top1_agreement:.1f}%)")


def random_images(count: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """Uniform noise in [0, 1]: every pixel independent, far from natural images."""
    return torch.rand(count, 3, height, width, generator=generator)


def smooth_images(count: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """Natural-looking stand-ins in [0, 1]: coarse 6x6 colour fields upscaled bicubically, plus light noise."""
    coarse = torch.rand(count, 3, 6, 6, generator=generator)
    fine = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (fine + 0.03 * torch.randn(fine.shape, generator=generator)).clamp_(0.0, 1.0)


def parity_cases(size: int, batch: int, normalize: Callable[[Tensor], Tensor], dynamic_batch: bool,
                 dynamic_shape: bool, real_images: Optional[Tensor] = None, per_case: int = 8,
                 seed: int = 0) -> List[ParityCase]:
    """The inputs of the verify step: noise and smooth images at the export size, a few real
    images when given, and other batch sizes / image sizes when the artifact claims them."""
    generator = torch.Generator().manual_seed(seed)

    def case(name: str, make: Callable[..., Tensor], height: int, width: int, chunk: int = batch) -> ParityCase:
        count = chunk * max(1, -(-per_case // chunk))  # at least per_case images, in whole chunks
        return ParityCase(name, normalize(make(count, height, width, generator)), chunk)

    cases = [case("random", random_images, size, size), case("smooth", smooth_images, size, size)]
    if real_images is not None and len(real_images) >= batch:
        cases.append(ParityCase("dataset", real_images[: len(real_images) // batch * batch], batch))
    if dynamic_batch:
        cases.append(case("random, other batch", random_images, size, size, chunk=batch + 2))
    if dynamic_shape:
        cases += [
            # 1.5x the size gives odd maps in MobileViT's last stage (96 px -> 3x3)
            case("smooth, larger", smooth_images, size * 3 // 2, size * 3 // 2),
            # odd maps from the first stages on, and height != width
            case("smooth, odd", smooth_images, size + 2, size + 18),
            case("smooth, smallest", smooth_images, MIN_DYNAMIC_SIDE, MIN_DYNAMIC_SIDE),
        ]
    return cases


@torch.no_grad()
def compare(reference: nn.Module, runner: Runner, case: ParityCase) -> ParityResult:
    """Run both models on the case's images, batch by batch; largest |logit diff|, top-1 agreement."""
    diffs, scales, agree = [], [], 0
    for chunk in case.images.split(case.batch):
        want, got = reference(chunk), runner(chunk)
        diffs.append((want - got).abs().max())
        scales.append(want.abs().max())
        agree += int((want.argmax(dim=1) == got.argmax(dim=1)).sum())
    _, _, height, width = case.images.shape
    # torch's max keeps a NaN, which Python's max(0.0, nan) would drop (and pass the check)
    worst, scale = torch.stack(diffs).max().item(), torch.stack(scales).max().item()
    return ParityResult(case.name, case.batch, height, width, len(case.images), worst, scale, agree)


def check_parity(reference: nn.Module, runner: Runner, cases: Sequence[ParityCase],
                 tolerance: float) -> List[ParityResult]:
    """Compare every case; raise ParityError naming the first case beyond `tolerance`
    (see ParityResult.within)."""
    reference = reference.eval()
    results = [compare(reference, runner, case) for case in cases]
    for result in results:
        if not result.within(tolerance):
            raise ParityError(
                f"parity check failed: {result.describe()} exceeds export.tolerance {tolerance:g}; "
                "the artifact does not reproduce the checkpoint model and was not written "
                "(raise --export.tolerance only if such a difference is acceptable)"
            )
    return results
