"""Draw ``docs/figures/architecture.svg`` from the code: the stages of :class:`~pneumoseg.networks.SCSEUNet`
with the tensor shapes of a forward pass at 256 px.

The shapes and the block counts are read from the network (forward hooks on one 256 x 256 image), so the
figure cannot drift from the code; only the layout is fixed here. Run by hand after changing the network::

    .venv/bin/python docs/figures/make_architecture_figure.py [--size 256] [--out docs/figures/architecture.svg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from pneumoseg.networks import SCSEUNet  # noqa: E402

BOX_W, BOX_H = 4.1, 0.72
COLOURS = {
    "io": "#eeeeee",
    "encoder": "#cfe2f3",
    "centre": "#d9d2e9",
    "decoder": "#d9ead3",
    "head": "#fff2cc",
    "cls": "#f4cccc",
}


def trace_shapes(size: int) -> tuple[SCSEUNet, dict[str, tuple[int, ...]]]:
    """Output shape (batch dim dropped) of every stage of a default 2D SCSEUNet for one ``size``² image."""
    torch.manual_seed(0)
    net = SCSEUNet(spatial_dims=2, in_channels=1).eval()
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape[1:])

        return hook

    for i, scse in enumerate(net.encoder.scse):
        scse.register_forward_hook(keep(f"layer{i + 1}"))
    net.decoder.centre_pool.register_forward_hook(keep("centre"))
    for i, block in enumerate(net.decoder.blocks):
        block.register_forward_hook(keep(f"block{i + 1}"))
    net.seg_head.reduce.register_forward_pre_hook(
        lambda module, inputs: shapes.__setitem__("hypercolumn", tuple(inputs[0].shape[1:]))
    )
    net.seg_head.reduce.register_forward_hook(keep("reduce"))
    net.seg_head.out.register_forward_hook(keep("head_out"))
    x = torch.zeros(1, 1, size, size)
    with torch.no_grad():
        out = net(x)
    shapes["input"] = tuple(x.shape[1:])
    shapes["seg"] = tuple(out.seg.shape[1:])
    shapes["cls"] = tuple(out.cls.shape[1:])
    return net, shapes


def fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def box(ax, x: float, y: float, text: str, kind: str, w: float = BOX_W, h: float = BOX_H) -> dict[str, tuple]:
    """A rounded box centred at (x, y); returns its anchor points (left, right, top, bottom)."""
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=COLOURS[kind],
            edgecolor="#444444",
            linewidth=0.8,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5, linespacing=1.25)
    return {"l": (x - w / 2, y), "r": (x + w / 2, y), "t": (x, y + h / 2), "b": (x, y - h / 2)}


def arrow(ax, start: tuple, end: tuple, style: str = "-|>", colour: str = "#333333", rad: float = 0.0) -> None:
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=9,
            color=colour,
            linewidth=0.9,
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=1,
            shrinkB=1,
        )
    )


def draw(net: SCSEUNet, shapes: dict[str, tuple[int, ...]], size: int, out: Path) -> None:
    enc = net.encoder
    blocks = [len(enc.layer1), len(enc.layer2), len(enc.layer3), len(enc.layer4)]
    reduction = round(enc.scse[0].cse.fc1.in_features / enc.scse[0].cse.fc1.out_features)
    up_mode = net.decoder.blocks[0].upsample.mode
    dropout = net.cls_head.dropout.p

    fig, ax = plt.subplots(figsize=(16.5, 8.6))
    ax.set_xlim(-3.0, 17.6)
    ax.set_ylim(-0.95, 7.75)
    ax.axis("off")
    xe, xc, xd, xh, xo = 0.0, 5.0, 8.0, 11.9, 15.4  # columns: encoder, concat, decoder, hypercolumn, head
    row = {level: 7 - level for level in range(7)}  # level k = resolution S / 2^k

    inp = box(ax, xe, row[0], f"input image\n{fmt(shapes['input'])}", "io")
    stage_text = [
        "patent layer 1 = stem: conv 7x7/2-BN-ReLU\n+ scSE   {}",
        f"patent layer 2: max-pool + layer1 ({blocks[0]} BasicBlocks)\n+ scSE   {{}}",
        f"patent layer 3: layer2 ({blocks[1]} BasicBlocks)\n+ scSE   {{}}",
        f"patent layer 4: layer3 ({blocks[2]} BasicBlocks)\n+ scSE   {{}}",
        f"patent layer 5: layer4 ({blocks[3]} BasicBlocks)\n+ scSE   {{}}",
    ]
    layers = []
    previous = inp
    for k in range(5):
        b = box(ax, xe, row[k + 1], stage_text[k].format(fmt(shapes[f"layer{k + 1}"])), "encoder")
        arrow(ax, previous["b"], b["t"])
        layers.append(b)
        previous = b
    ax.text(xe, row[0] + 0.55, "ResNet34Encoder (MONAI resnet34, scSE in-line)", ha="center", fontsize=9, weight="bold")

    centre = box(ax, xc, row[6], f"centre: max-pool 2x2 of layer 5\n{fmt(shapes['centre'])}  (stride 64)", "centre")
    arrow(ax, layers[4]["r"], centre["l"])

    decoder = []
    for k in range(5):
        level = 5 - k  # block 1 outputs S/32 ... block 5 outputs S/2
        text = f"DecoderBlock {k + 1}: up x2 ({up_mode})\n(conv3x3-BN-ReLU)x2 + scSE  {fmt(shapes[f'block{k + 1}'])}"
        decoder.append(box(ax, xd, row[level], text, "decoder"))
    ax.text(xd, row[0] + 0.55, "UNetDecoder", ha="center", fontsize=9, weight="bold")
    arrow(ax, centre["r"], decoder[0]["b"], rad=0.25)
    for k in range(1, 5):
        level = 6 - k  # skip of block k+1: encoder layer 6-k at resolution S / 2^(6-k)
        cx, cy = xc, row[level]
        ax.add_patch(plt.Circle((cx, cy), 0.2, facecolor="white", edgecolor="#444444", linewidth=0.8))
        ax.text(cx, cy, "cat", ha="center", va="center", fontsize=6.5)
        arrow(ax, layers[level - 1]["r"], (cx - 0.2, cy), colour="#1f5fa8")  # skip connection
        arrow(ax, decoder[k - 1]["l"], (cx + 0.2, cy))
        # into the bottom of the block above, so that it does not meet the arrow leaving that block
        arrow(ax, (cx, cy + 0.2), (xd - BOX_W / 2 + 0.35, decoder[k]["b"][1]), rad=-0.2)
    ax.text(
        xe + BOX_W / 2 + 0.15,
        row[1],
        "layer 1 (stem) is not fused as a skip",
        ha="left",
        va="center",
        fontsize=7,
        style="italic",
        color="#666666",
    )

    hyper_h = row[1] - row[5] + BOX_H
    hyper = box(
        ax,
        xh,
        (row[1] + row[5]) / 2,
        f"HypercolumnHead\n\nblocks 1-4 bilinear\nup-sampled to S/2,\nconcatenated with\nblock 5\n\n"
        f"{fmt(shapes['hypercolumn'])}",
        "head",
        w=2.6,
        h=hyper_h,
    )
    for b in decoder:
        arrow(ax, b["r"], (hyper["l"][0], b["r"][1]), colour="#a36a00")
    reduce_ = box(ax, xo, row[4], f"conv 1x1-BN-ReLU (reduction)\n{fmt(shapes['reduce'])}", "head", w=3.3)
    logits = box(ax, xo, row[3] + 0.15, f"conv 3x3 -> logits\n{fmt(shapes['head_out'])}", "head", w=3.3)
    seg = box(ax, xo, row[1] + 0.3, f"bilinear x2 -> seg logits\n{fmt(shapes['seg'])}", "io", w=3.3)
    arrow(ax, hyper["r"], reduce_["l"])
    arrow(ax, reduce_["t"], logits["b"])
    arrow(ax, logits["t"], seg["b"])
    ax.text(xo, seg["t"][1] + 0.18, "SCSEUNetOutput.seg", ha="center", fontsize=8.5, weight="bold")

    cls = box(
        ax,
        xe,
        row[6] - 0.25,
        f"ClassificationHead: GAP -> dropout {dropout:g}\n-> linear -> cls logit {fmt(shapes['cls'])}",
        "cls",
    )
    arrow(ax, layers[4]["b"], cls["t"])
    ax.text(xe, cls["b"][1] - 0.22, "SCSEUNetOutput.cls", ha="center", fontsize=8.5, weight="bold")

    ax.text(
        -2.9,
        -0.6,
        f"scSE(U) = U * sigmoid(W2 ReLU(W1 GAP(U)))  +  U * sigmoid(conv1x1(U))   (cSE + sSE, r = {reduction})\n"
        f"Shapes [C, H, W] for a {size} x {size} input (traced from the code); inputs that are not a multiple of 64 "
        "are padded and the outputs cropped. Generated by docs/figures/make_architecture_figure.py",
        fontsize=7.5,
        ha="left",
        color="#333333",
    )
    for level in range(7):
        ax.text(-2.9, row[level], "S" if level == 0 else f"S/{2**level}", va="center", fontsize=8, color="#888888")
    out.parent.mkdir(parents=True, exist_ok=True)
    # text as text and no timestamp/random ids: a small SVG that only changes when the figure does
    plt.rcParams["svg.fonttype"] = "none"
    plt.rcParams["svg.hashsalt"] = "pneumoseg"
    fig.savefig(out, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw the SCSEUNet architecture figure from the code.")
    parser.add_argument("--size", type=int, default=256, help="input size in px for the traced shapes (default 256)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).with_name("architecture.svg"),
        help="output file; the suffix picks the format (.svg or .png) (default: architecture.svg beside this script)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, shapes = trace_shapes(args.size)
    draw(net, shapes, args.size, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
