"""``pneumoseg demo``: the README's first command, on the embedded synthetic data.

Draws synthetic chest radiograph phantoms (about half with a pneumothorax), trains
:class:`~pneumoseg.networks.SCSEUNet` with the fused multi-task loss for a few steps, then reports
what it did: the loss curve, Dice and image-level accuracy on held-out phantoms, and a PNG with
the loss curve and overlays to look at. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pneumoseg.data.phantoms import make_radiograph_phantom
from pneumoseg.losses import FusedMultiTaskLoss
from pneumoseg.networks import SCSEUNet


@dataclass
class DemoConfig:
    """Every default of the demo lives here; the CLI only exposes them."""

    out_dir: Path = Path("demo_output")
    size: int = 128
    train_images: int = 24
    test_images: int = 12
    batch_size: int = 8
    steps: int = 60
    learning_rate: float = 1e-3
    seed: int = 0
    device: str = "auto"


def select_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def phantom_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` phantoms, alternating negative/positive: images ``[n,1,S,S]`` in [0,1], masks ``[n,1,S,S]``."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        image, mask = make_radiograph_phantom(size=size, positive=bool(i % 2), rng=rng)
        image = image.astype(np.float32)
        lo, hi = np.percentile(image, (0.5, 99.5))
        images.append(np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32))
        masks.append(mask.astype(np.float32))
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(masks)[:, None])


def dice_per_image(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """SIIM Dice per image ``[B]``; an empty prediction on an empty truth scores 1."""
    pred, truth = pred.flatten(1).bool(), truth.flatten(1).bool()
    inter = (pred & truth).sum(1).float()
    total = (pred.sum(1) + truth.sum(1)).float()
    return torch.where(total == 0, torch.ones_like(total), 2 * inter / total.clamp(min=1))


def run_demo(config: DemoConfig) -> dict[str, float]:
    torch.manual_seed(config.seed)
    device = select_device(config.device)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"pneumoseg demo: device {device}, {config.train_images} training + {config.test_images} held-out "
        f"synthetic radiographs at {config.size} px"
    )
    start = time.perf_counter()
    train_x, train_y = phantom_batch(config.train_images, config.size, config.seed)
    test_x, test_y = phantom_batch(config.test_images, config.size, config.seed + 1)
    print(f"  drew the phantoms in {time.perf_counter() - start:.1f} s")

    network = SCSEUNet(spatial_dims=2, in_channels=1, out_channels=1).to(device)
    loss_fn = FusedMultiTaskLoss()
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate)
    params = sum(p.numel() for p in network.parameters())
    print(
        f"  SCSEUNet: {params / 1e6:.1f} M parameters; fused loss = "
        f"{loss_fn.seg_weight} x (BCE + Dice) + {loss_fn.cls_weight} x image BCE"
    )

    generator = torch.Generator().manual_seed(config.seed)
    history: list[tuple[int, float, float, float, float]] = []
    start = time.perf_counter()
    network.train()
    for step in range(1, config.steps + 1):
        idx = torch.randperm(config.train_images, generator=generator)[: config.batch_size]
        x, y = train_x[idx].to(device), train_y[idx].to(device)
        if torch.rand(1, generator=generator).item() < 0.5:  # flip augmentation, image and mask together
            x, y = x.flip(-1), y.flip(-1)
        out = network(x)
        terms = loss_fn(out.seg, out.cls, y)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        history.append((step, *(t.item() for t in terms)))
        if step == 1 or step % max(1, config.steps // 6) == 0 or step == config.steps:
            print(
                f"  step {step:4d}/{config.steps}  loss {terms.total.item():.4f}  (pixel BCE "
                f"{terms.seg_bce.item():.4f}, Dice {terms.seg_dice.item():.4f}, image BCE {terms.cls_bce.item():.4f})"
            )
    train_seconds = time.perf_counter() - start

    network.eval()
    with torch.no_grad():
        out = network(test_x.to(device))
        seg_prob = torch.sigmoid(out.seg).cpu()
        cls_prob = torch.sigmoid(out.cls).cpu().flatten()
    has_ptx = test_y.flatten(1).amax(1) > 0
    pred_mask = (seg_prob > 0.5) & (cls_prob > 0.5).view(-1, 1, 1, 1)
    dice = dice_per_image(pred_mask, test_y > 0.5)
    results = {
        "train_seconds": train_seconds,
        "images_per_second": config.steps * config.batch_size / train_seconds,
        "first_loss": history[0][1],
        "last_loss": history[-1][1],
        "held_out_siim_dice": dice.mean().item(),
        "held_out_positive_dice": dice[has_ptx].mean().item() if has_ptx.any() else float("nan"),
        "held_out_image_accuracy": ((cls_prob > 0.5) == has_ptx).float().mean().item(),
    }
    figure = _save_figure(config.out_dir / "demo.png", history, test_x, test_y, seg_prob, cls_prob)
    print(
        f"  trained {config.steps} steps in {train_seconds:.1f} s ({results['images_per_second']:.1f} images/s); "
        f"loss {results['first_loss']:.3f} -> {results['last_loss']:.3f}"
    )
    print(
        f"  held-out: SIIM Dice {results['held_out_siim_dice']:.3f}, Dice on positives "
        f"{results['held_out_positive_dice']:.3f}, image accuracy {results['held_out_image_accuracy']:.3f} "
        "(a short demo run; see benchmarks/ for a full training)"
    )
    if figure is not None:
        print(f"  loss curve and overlays: {figure}")
    return results


def _save_figure(path: Path, history, images, masks, seg_prob, cls_prob) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional extra: the demo still prints its numbers
        return None
    steps = [h[0] for h in history]
    cols = min(4, images.shape[0])
    fig, axes = plt.subplots(1, cols + 1, figsize=(3.2 * (cols + 1), 3.4))
    for label, column in (("total", 1), ("pixel BCE", 2), ("Dice", 3), ("image BCE", 4)):
        axes[0].plot(steps, [h[column] for h in history], label=label)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("fused loss")
    axes[0].legend(fontsize=7)
    for ax, i in zip(axes[1:], range(cols)):
        ax.imshow(images[i, 0], cmap="gray")
        ax.contour(masks[i, 0], levels=[0.5], colors="lime", linewidths=0.8)
        ax.contour(seg_prob[i, 0], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"p(pneumothorax)={cls_prob[i]:.2f}\ngreen truth, red prediction", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg demo``."""
    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="train the network briefly on synthetic phantoms and report what it did",
        description="Draw synthetic chest radiograph phantoms, train SCSEUNet with the fused multi-task loss for "
        "a few steps on them, and report the loss curve, held-out Dice and image accuracy, and a PNG of "
        "overlays. Runs on CPU in about a minute.",
    )
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="where the figure is written")
    parser.add_argument("--size", type=int, default=defaults.size, help="image size in pixels")
    parser.add_argument("--train-images", type=int, default=defaults.train_images, help="training phantoms")
    parser.add_argument("--test-images", type=int, default=defaults.test_images, help="held-out phantoms")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (phantoms and training)")
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA if present, else CPU), cpu, cuda:0 ...")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_demo(
        DemoConfig(
            out_dir=args.out_dir,
            size=args.size,
            train_images=args.train_images,
            test_images=args.test_images,
            batch_size=args.batch_size,
            steps=args.steps,
            learning_rate=args.learning_rate,
            seed=args.seed,
            device=args.device,
        )
    )
    return 0
