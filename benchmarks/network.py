"""Cost, speed and reduced-precision accuracy of :class:`~pneumoseg.networks.SCSEUNet` against its peer.

The peer is MONAI's ``FlexibleUNet(in_channels=1, out_channels=1, backbone="resnet34", pretrained=False,
spatial_dims=2)``: the same ResNet34 encoder and decoder widths, without scSE, hypercolumn or the
classification head. Every number in the table comes from the same run, with the same inputs:

* parameters, and forward GFLOP per image counted by ``torch.utils.flop_counter.FlopCounterMode``
  (convolutions and matrix products only; 1 multiply-add = 2 FLOPs);
* inference images/s (``eval`` + ``torch.inference_mode``) and training-step images/s (forward + loss +
  backward + Adam step; the project's ``FusedMultiTaskLoss``, the peer's MONAI ``DiceCELoss``) per size,
  in fp32 and in reduced precision + channels_last (CPU: bf16 autocast; CUDA: bf16 autocast if the GPU
  supports it, else fp16 autocast with a gradient scaler);
* the mean absolute difference of the segmentation probabilities between the reduced-precision and the
  fp32 forward pass, same weights and input.

Timings are medians over ``--repeats``, after ``--warmup`` iterations; the networks and precisions are
timed in interleaved rounds so that a change of machine load hits all of them alike. The targets the
project states are checked at the end (PASS/MISS). Run::

    .venv/bin/python benchmarks/network.py            # full run (sizes 256 and 512, ~10 min on 2 cores)
    .venv/bin/python benchmarks/network.py --quick    # smoke run (256 px, few repeats)
    .venv/bin/python benchmarks/network.py --trained BUNDLE   # bf16 vs fp32 on trained weights, hard phantoms
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import monai
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pneumoseg.losses import FusedMultiTaskLoss
from pneumoseg.networks import SCSEUNet, SCSEUNetOutput

PROJECT = "SCSEUNet"
PEER = "FlexibleUNet-resnet34"
FP32 = "fp32"

# the targets the project states (docs/architecture.md)
MAX_PROB_MAD = 1e-2  # reduced-precision vs fp32 segmentation probabilities, mean absolute difference
MIN_FP32_SPEED_VS_PEER = 0.75  # project fp32 inference images/s relative to the peer's
MIN_BF16_SPEEDUP = 2.0  # project bf16+channels_last inference relative to its own fp32, on CPUs with bf16


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether the CPU computes bf16 natively (oneDNN + avx512_bf16 or AMX), and the evidence for it.

    Without native bf16 oneDNN emulates it and bf16 autocast is slower than fp32, so the speed-up
    target only applies to CPUs that have it.
    """
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = sorted(flags & {"avx512_bf16", "amx_bf16"})
    mkldnn = torch.backends.mkldnn.is_available()
    supported = mkldnn and bool(isa)
    evidence = f"mkldnn={'yes' if mkldnn else 'no'}, cpu flags: {', '.join(isa) if isa else 'no avx512_bf16/amx_bf16'}"
    return supported, evidence


@dataclass(frozen=True)
class Precision:
    """A numeric mode: ``autocast`` dtype (None = fp32) and whether tensors are channels_last."""

    name: str
    autocast: torch.dtype | None = None
    channels_last: bool = False
    grad_scaler: bool = False  # fp16 training needs loss scaling, bf16 does not

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def reduced_precision(device: torch.device) -> Precision:
    """The reduced-precision mode to compare with fp32 on ``device``."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision("fp16+CL", torch.float16, channels_last=True, grad_scaler=True)
    return Precision("bf16+CL", torch.bfloat16, channels_last=True)


@dataclass
class Row:
    """One line of the table: one network at one size and precision."""

    network: str
    size: int
    batch: int
    precision: str
    params_m: float
    gflop_per_image: float
    infer_images_per_s: float = float("nan")
    train_images_per_s: float = float("nan")
    prob_mad_vs_fp32: float | None = None
    prob_max_abs_diff_vs_fp32: float | None = None
    infer_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)


@dataclass
class Target:
    """A stated target and whether it was met (``None``: not applicable here)."""

    description: str
    value: float
    threshold: float
    passed: bool | None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Networks, losses and inputs
# ---------------------------------------------------------------------------------------------
def build_networks() -> dict[str, nn.Module]:
    """The project network and its peer, both 2D with one input channel and random weights."""
    return {
        PROJECT: SCSEUNet(spatial_dims=2, in_channels=1),
        PEER: FlexibleUNet(in_channels=1, out_channels=1, backbone="resnet34", pretrained=False, spatial_dims=2),
    }


def build_loss(name: str) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """The training loss of each network: ``(network output, mask [B, 1, H, W]) -> scalar``."""
    if name == PROJECT:
        fused = FusedMultiTaskLoss()
        return lambda out, mask: fused(out.seg, out.cls, mask).total
    # the peer has no classification output: the segmentation half of the fused loss (BCE + batch Dice)
    dice_bce = DiceCELoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
    return lambda out, mask: dice_bce(out.float(), mask)


def seg_logits(out: torch.Tensor | SCSEUNetOutput) -> torch.Tensor:
    """``[B, 1, H, W]`` segmentation logits of either network."""
    return out.seg if isinstance(out, SCSEUNetOutput) else out


def make_batch(batch: int, size: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible image batch ``[B, 1, S, S]`` (N(0, 1)) and mask batch (a square in every other image)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 1, size, size, generator=gen)
    masks = torch.zeros(batch, 1, size, size)
    masks[::2, :, size // 4 : size // 2, size // 8 : size // 3] = 1.0
    return images.to(device), masks.to(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gflop_per_image(model: nn.Module, size: int, device: torch.device) -> float:
    """Forward FLOPs (2 per multiply-add; convolutions and matrix products only) of one image, in 1e9."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, size, size, device=device))
    return counter.get_total_flops() / 1e9


def calibrate_batch_norm(model: nn.Module, images: torch.Tensor, passes: int = 3) -> None:
    """Set batch-norm running statistics to the cumulative mean over ``passes`` batches.

    With freshly initialised statistics (mean 0, variance 1) a random-weight ResNet's eval-mode
    activations grow stage after stage and saturate the output sigmoid, which would make the
    reduced-precision comparison meaningless; calibrated statistics give activations of the scale
    a trained network has.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_step(model: nn.Module, images: torch.Tensor, precision: Precision, device: torch.device) -> Callable:
    """A closure running one inference forward pass (the whole network, both heads)."""
    model.eval()

    def step() -> None:
        with torch.inference_mode(), precision.context(device):
            model(images)

    return step


def training_step(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    masks: torch.Tensor,
    precision: Precision,
    device: torch.device,
) -> Callable:
    """A closure running one training step: forward, loss, backward, Adam step."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision.context(device):
            loss = loss_fn(model(images), masks)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def time_interleaved(
    steps: dict[Any, Callable[[], None]], warmup: int, repeats: int, device: torch.device
) -> dict[Any, list[float]]:
    """Seconds per call of every step, ``repeats`` times, in rounds that visit every step once."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[Any, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            seconds[key].append(time.perf_counter() - start)
    return seconds


def as_format(model: nn.Module, images: torch.Tensor, precision: Precision) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` (same weights) and ``images`` in ``precision``'s memory format."""
    fmt = precision.memory_format()
    return copy.deepcopy(model).to(memory_format=fmt), images.contiguous(memory_format=fmt)


@torch.inference_mode()
def probability_difference(
    model: nn.Module, images: torch.Tensor, precision: Precision, device: torch.device
) -> tuple[float, float]:
    """Mean and max |sigmoid(seg)| difference between ``precision`` and fp32 on the same weights/input."""
    model.eval()
    reference = torch.sigmoid(seg_logits(model(images)).float())
    reduced_model, reduced_images = as_format(model, images, precision)
    reduced_model.eval()
    with precision.context(device):
        reduced = torch.sigmoid(seg_logits(reduced_model(reduced_images)).float())
    diff = (reduced - reference).abs()
    return float(diff.mean()), float(diff.max())


def benchmark_size(
    networks: dict[str, nn.Module],
    size: int,
    batch: int,
    precisions: list[Precision],
    args: argparse.Namespace,
    device: torch.device,
) -> list[Row]:
    """All rows of one image size: every network in every precision."""
    images, masks = make_batch(batch, size, device, args.seed)
    rows: dict[tuple[str, str], Row] = {}
    infer: dict[tuple[str, str], Callable] = {}
    train: dict[tuple[str, str], Callable] = {}
    for name, model in networks.items():
        calibrate_batch_norm(model, images)
        params_m = count_parameters(model) / 1e6
        gflop = forward_gflop_per_image(model, size, device)
        for precision in precisions:
            key = (name, precision.name)
            row = Row(name, size, batch, precision.name, params_m, gflop)
            if precision.name != FP32:
                row.prob_mad_vs_fp32, row.prob_max_abs_diff_vs_fp32 = probability_difference(
                    model, images, precision, device
                )
            rows[key] = row
            infer_model, infer_images = as_format(model, images, precision)
            infer[key] = inference_step(infer_model, infer_images, precision, device)
            train_model, train_images = as_format(model, images, precision)
            train[key] = training_step(train_model, build_loss(name), train_images, masks, precision, device)
    for key, seconds in time_interleaved(infer, args.warmup, args.repeats, device).items():
        rows[key].infer_seconds = seconds
        rows[key].infer_images_per_s = batch / statistics.median(seconds)
    infer.clear()  # free the inference copies before training allocates activations and optimiser state
    for key, seconds in time_interleaved(train, args.warmup, args.repeats, device).items():
        rows[key].train_seconds = seconds
        rows[key].train_images_per_s = batch / statistics.median(seconds)
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Targets, table, profile
# ---------------------------------------------------------------------------------------------
def check_targets(rows: list[Row], reduced: Precision, device: torch.device, bf16_native: bool) -> list[Target]:
    """The project's stated targets, per image size."""
    by_key = {(r.network, r.size, r.precision): r for r in rows}
    targets: list[Target] = []
    for size in sorted({r.size for r in rows}):
        own32, ownrp = by_key[(PROJECT, size, FP32)], by_key[(PROJECT, size, reduced.name)]
        peer32 = by_key[(PEER, size, FP32)]
        mad = ownrp.prob_mad_vs_fp32 if ownrp.prob_mad_vs_fp32 is not None else float("nan")
        targets.append(
            Target(
                f"{size}px: {PROJECT} {reduced.name} vs fp32 segmentation probability mean |diff|",
                mad,
                MAX_PROB_MAD,
                mad <= MAX_PROB_MAD,
            )
        )
        ratio = own32.infer_images_per_s / peer32.infer_images_per_s
        targets.append(
            Target(
                f"{size}px: {PROJECT} fp32 inference images/s / {PEER} fp32",
                ratio,
                MIN_FP32_SPEED_VS_PEER,
                ratio >= MIN_FP32_SPEED_VS_PEER,
            )
        )
        speedup = ownrp.infer_images_per_s / own32.infer_images_per_s
        applies = device.type == "cpu" and bf16_native and reduced.autocast is torch.bfloat16
        targets.append(
            Target(
                f"{size}px: {PROJECT} {reduced.name} inference images/s / its fp32",
                speedup,
                MIN_BF16_SPEEDUP,
                (speedup >= MIN_BF16_SPEEDUP) if applies else None,
                "" if applies else "target stated for CPUs with native bf16 only",
            )
        )
    return targets


def format_table(rows: list[Row]) -> str:
    header = (
        "| network | size px | batch | precision | params (M) | GFLOP/img fwd | inference img/s "
        "| train-step img/s | seg prob mean abs diff vs fp32 |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        mad = "-" if r.prob_mad_vs_fp32 is None else f"{r.prob_mad_vs_fp32:.2e} (max {r.prob_max_abs_diff_vs_fp32:.2e})"
        lines.append(
            f"| {r.network} | {r.size} | {r.batch} | {r.precision} | {r.params_m:.2f} | {r.gflop_per_image:.2f} "
            f"| {r.infer_images_per_s:.2f} | {r.train_images_per_s:.2f} | {mad} |"
        )
    return "\n".join(lines)


def format_targets(targets: list[Target]) -> str:
    lines = []
    for t in targets:
        verdict = "n/a " if t.passed is None else ("PASS" if t.passed else "MISS")
        relation = "<=" if t.threshold == MAX_PROB_MAD else ">="
        note = f" ({t.note})" if t.note else ""
        lines.append(f"- {verdict} {t.description}: {t.value:.3g} (target {relation} {t.threshold:g}){note}")
    return "\n".join(lines)


def profile_networks(
    networks: dict[str, nn.Module], size: int, batch: int, precisions: list[Precision], device: torch.device
) -> str:
    """Top operators by self time of one inference forward pass per network and precision."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    images, _ = make_batch(batch, size, device, seed=0)
    reports = []
    for name, model in networks.items():
        for precision in precisions:
            m, x = as_format(model, images, precision)
            step = inference_step(m, x, precision, device)
            step()  # warm-up outside the profile
            synchronize(device)
            with profile(activities=activities) as prof:
                step()
                synchronize(device)
            table = prof.key_averages().table(sort_by=sort_by, row_limit=12)
            reports.append(f"### {name} {precision.name} {size}px batch {batch} (inference)\n{table}")
    return "\n".join(reports)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_batch(size: int) -> int:
    """4 images at 256 px, 2 at 512 px: constant pixels per batch, at least 1 image."""
    return max(1, round(4 * 256 / size))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Parameters, GFLOPs, inference and training-step images/s and bf16 accuracy of SCSEUNet "
        "versus MONAI FlexibleUNet(resnet34), with PASS/MISS for the project's targets.",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="square image sizes in px (default: 256 512; --quick: 256)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per batch at every size (default: 4 at 256 px, 2 at 512 px; --quick: 2)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed iterations per measurement; the median is reported (default: 5; --quick: 2)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations before timing (default: 2; --quick: 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=available_cores(), help="torch CPU threads (default: all available cores)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:N] (default: "
        "cuda if available, else cpu); on CUDA the reduced precision is bf16 if supported, else fp16",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 px only, batch 2, 2 repeats, 1 warm-up")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print the top operators by self time of one inference pass per network and precision (first size)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table and targets to this JSON file")
    parser.add_argument(
        "--trained",
        type=Path,
        default=None,
        metavar="BUNDLE",
        help="instead: bf16 vs fp32 probabilities of this trained bundle (record + models/model.pt) on hard phantoms",
    )
    parser.add_argument("--trained-images", type=int, default=16, help="--trained: phantom images (default: 16)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([256] if args.quick else [256, 512])
    args.batch = args.batch or (2 if args.quick else None)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if any(s < 64 for s in args.sizes) or args.repeats < 1 or args.threads < 1:
        parser.error("sizes must be >= 64, repeats and threads >= 1")
    return args


class Float32(nn.Module):
    """Run ``module`` in fp32 inside an autocast region (inputs cast up, autocast off)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Any) -> Any:
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type, enabled=False):
            return self.module(*[_to_float(x) for x in inputs])


def _to_float(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float()
    return [_to_float(v) for v in x] if isinstance(x, (list, tuple)) else x


def trained_inputs(record: Any, count: int, seed: int) -> torch.Tensor:
    """``count`` hard phantom radiographs (half positive) through the record's inference preprocessing."""
    import numpy as np
    from monai.data import MetaTensor

    from pneumoseg.data.phantoms import make_radiograph_phantom
    from pneumoseg.data.transforms import radiograph_inference_transforms

    pp = record.radiograph
    chain = radiograph_inference_transforms(pp.image_size, pp.lower_percentile, pp.upper_percentile, load=False)
    images = []
    for i in range(count):
        image, _ = make_radiograph_phantom(pp.image_size * 2, i % 2 == 0, np.random.default_rng([seed, i]), hard=True)
        images.append(chain({"image": MetaTensor(torch.as_tensor(image.astype(np.float32))[None])})["image"])
    return torch.stack([torch.as_tensor(x) for x in images])


def trained_precision_report(bundle: Path, count: int, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """bf16 + channels_last vs fp32 segmentation and image probabilities of a TRAINED model on phantom inputs:
    the whole network in bf16, and with parts kept in fp32 (the encoder's last stage; the segmentation head)."""
    from pneumoseg.model_record import load_trained_model

    trained = load_trained_model(bundle, device)
    images = trained_inputs(trained.record, count, seed).to(device)
    reduced = reduced_precision(device)
    base = trained.network.eval()
    with torch.inference_mode():
        ref = base(images)
    ref_seg, ref_cls = torch.sigmoid(ref.seg.float()), torch.sigmoid(ref.cls.float())
    variants: dict[str, Callable[[nn.Module], None]] = {
        "bf16 everywhere": lambda net: None,
        "encoder layer4 + scSE in fp32": lambda net: (
            setattr(net.encoder, "layer4", Float32(net.encoder.layer4)),
            net.encoder.scse.__setitem__(4, Float32(net.encoder.scse[4])),
        ),
        "segmentation head in fp32": lambda net: setattr(net, "seg_head", Float32(net.seg_head)),
    }
    rows = []
    for name, change in variants.items():
        net = copy.deepcopy(base)
        change(net)
        net, x = as_format(net, images, reduced)
        with torch.inference_mode(), reduced.context(device):
            out = net.eval()(x)
        seg, cls = torch.sigmoid(out.seg.float()), torch.sigmoid(out.cls.float())
        diff = (seg - ref_seg).abs()
        rows.append({
            "variant": name, "seg_prob_mad": float(diff.mean()), "seg_prob_max": float(diff.max()),
            "mask_pixels_flipped": float(((seg > 0.5) != (ref_seg > 0.5)).float().mean()),
            "cls_prob_max_abs_diff": float((cls - ref_cls).abs().max()),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.trained is not None:
        rows = trained_precision_report(args.trained, args.trained_images, args.seed, device)
        print(f"# trained weights: {args.trained} ({args.trained_images} hard phantoms at the record's input size)")
        print("| precision | seg prob mean abs diff vs fp32 | max | mask pixels flipped at 0.5 | image prob max diff |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            verdict = "PASS" if r["seg_prob_mad"] <= MAX_PROB_MAD else "MISS"
            mad = f"{r['seg_prob_mad']:.2e} ({verdict} <= {MAX_PROB_MAD:g})"
            print(f"| {r['variant']} | {mad} | {r['seg_prob_max']:.3f} | {r['mask_pixels_flipped']:.2e} "
                  f"| {r['cls_prob_max_abs_diff']:.3f} |")  # fmt: skip
        if args.json is not None:
            args.json.write_text(json.dumps({"trained": str(args.trained), "rows": rows}, indent=2) + "\n")
        return 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    bf16_native, bf16_evidence = cpu_bf16_support()
    reduced = reduced_precision(device)
    precisions = [Precision(FP32), reduced]
    torch.manual_seed(args.seed)
    networks = {name: net.to(device) for name, net in build_networks().items()}
    environment = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "cpu_bf16_native": bf16_native,
        "cpu_bf16_evidence": bf16_evidence,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "load_average_start": os.getloadavg(),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(
        f"# {PROJECT} vs {PEER}: device {environment['device']}, {args.threads} threads, torch {torch.__version__}, "
        f"monai {monai.__version__}\n# CPU native bf16: {'yes' if bf16_native else 'no'} ({bf16_evidence}); "
        f"median of {args.repeats} after {args.warmup} warm-up; load average at start "
        f"{', '.join(f'{v:.1f}' for v in environment['load_average_start'])}",
        flush=True,
    )
    rows: list[Row] = []
    started = time.perf_counter()
    with threads(args.threads):
        for size in args.sizes:
            batch = args.batch or default_batch(size)
            rows += benchmark_size(networks, size, batch, precisions, args, device)
            print(f"# {size}px done after {time.perf_counter() - started:.0f} s", flush=True)
        targets = check_targets(rows, reduced, device, bf16_native)
        environment["load_average_end"] = os.getloadavg()
        environment["seconds"] = time.perf_counter() - started
        print(
            "\nGFLOP: forward pass of one image, convolutions + matrix products only, "
            "FLOPs = 2 x multiply-adds (torch.utils.flop_counter)."
        )
        print(format_table(rows))
        print(f"\nTargets (load average at end {', '.join(f'{v:.1f}' for v in environment['load_average_end'])}):")
        print(format_targets(targets))
        if args.profile:
            size = args.sizes[0]
            print("\n" + profile_networks(networks, size, args.batch or default_batch(size), precisions, device))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "environment": environment,
            "flop_convention": "forward, per image, conv + matmul only, FLOPs = 2 x MACs",
            "rows": [asdict(r) for r in rows],
            "targets": [asdict(t) for t in targets],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
