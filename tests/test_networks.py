"""SCSEUNet: shapes, scSE arithmetic, torchvision checkpoint loading, gradients, overfitting, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pneumoseg.losses import FusedMultiTaskLoss
from pneumoseg.networks import (
    ChannelSE,
    SCSEBlock,
    SCSEUNet,
    SegmentationView,
)

SMALL_DECODER = (32, 16, 16, 8, 8)  # keeps 3D tests to seconds on 2 CPU cores


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (100, 77), (33, 200)])
def test_2d_output_shapes(size):
    net = SCSEUNet(spatial_dims=2, in_channels=1).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size))
    assert out.seg.shape == (2, 1, *size)
    assert out.cls.shape == (2, 1)
    assert out.seg is out[0] and out.cls is out[1]  # the documented named-tuple contract


@pytest.mark.parametrize("size", [(64, 64, 64), (40, 64, 70)])
def test_3d_output_shapes(size):
    net = SCSEUNet(spatial_dims=3, in_channels=1, out_channels=2, decoder_channels=SMALL_DECODER).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, *size))
    assert out.seg.shape == (1, 2, *size)
    assert out.cls.shape == (1, 1)


def test_padding_does_not_leak_into_the_crop():
    """A non-multiple size is padded and cropped back: the crop is the centre of the padded output."""
    torch.manual_seed(0)
    net = SCSEUNet().eval()
    x = torch.randn(1, 1, 100, 64)
    with torch.no_grad():
        out = net(x).seg
        padded = net(torch.nn.functional.pad(x, (0, 0, 14, 14))).seg
    torch.testing.assert_close(out, padded[:, :, 14:114], rtol=1e-4, atol=1e-4)


def test_unpadded_mode_rejects_bad_sizes_naming_the_nearest_valid_one():
    net = SCSEUNet(pad_input=False)
    with pytest.raises(ValueError, match=r"\[100, 64\].*nearest valid size \[128, 64\]"):
        net(torch.randn(1, 1, 100, 64))


def test_scse_matches_hand_computation():
    torch.manual_seed(1)
    block = SCSEBlock(spatial_dims=2, channels=4, reduction=2)
    torch.nn.init.normal_(block.sse.conv.weight)  # the sSE conv starts at zero; make its gate non-trivial
    torch.nn.init.normal_(block.sse.conv.bias)
    x = torch.randn(2, 4, 3, 5)
    w1, b1 = block.cse.fc1.weight, block.cse.fc1.bias  # [2, 4], [2]
    w2, b2 = block.cse.fc2.weight, block.cse.fc2.bias  # [4, 2], [4]
    wc, bc = block.sse.conv.weight.view(4), block.sse.conv.bias  # 1x1 conv C -> 1
    expected_cse = torch.empty_like(x)
    expected_sse = torch.empty_like(x)
    for b in range(2):
        pooled = [x[b, c].mean() for c in range(4)]
        hidden = [max(0.0, float(sum(w1[h, c] * pooled[c] for c in range(4)) + b1[h])) for h in range(2)]
        gate_c = [torch.sigmoid(sum(w2[c, h] * hidden[h] for h in range(2)) + b2[c]) for c in range(4)]
        for i in range(3):
            for j in range(5):
                gate_s = torch.sigmoid(sum(wc[c] * x[b, c, i, j] for c in range(4)) + bc[0])
                for c in range(4):
                    expected_cse[b, c, i, j] = x[b, c, i, j] * gate_c[c]
                    expected_sse[b, c, i, j] = x[b, c, i, j] * gate_s
    with torch.no_grad():
        torch.testing.assert_close(block.cse(x), expected_cse)
        torch.testing.assert_close(block.sse(x), expected_sse)
        torch.testing.assert_close(block(x), expected_cse + expected_sse)  # branches are added


def test_scse_bottleneck_never_below_one_unit():
    assert ChannelSE(4, reduction=16).fc1.out_features == 1
    assert ChannelSE(64, reduction=16).fc1.out_features == 4


def test_every_encoder_stage_and_decoder_block_is_scse_corrected():
    net = SCSEUNet()
    assert len(net.encoder.scse) == 5
    assert len(net.decoder.blocks) == 5
    assert all(isinstance(block.scse, SCSEBlock) for block in net.decoder.blocks)


def test_sse_gate_starts_at_one_half():
    block = SCSEBlock(spatial_dims=2, channels=8)
    x = torch.rand(1, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block.sse(x), 0.5 * x)


@pytest.mark.parametrize("spatial_dims, size", [(2, (128, 192)), (3, (64, 64, 128))])
def test_hypercolumn_head_equals_reduce_of_the_concatenated_upsampled_outputs(spatial_dims, size):
    """The head avoids materialising the hypercolumn; it must equal the patent's literal recipe:
    up-sample every decoder output to the finest resolution, concatenate, then reduce."""
    torch.manual_seed(0)
    channels = (256, 128, 64, 32, 16) if spatial_dims == 2 else SMALL_DECODER
    net = SCSEUNet(spatial_dims=spatial_dims, decoder_channels=channels).eval()
    head = net.seg_head
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    with torch.no_grad():
        decoded = net.decoder(net.encoder(torch.randn(1, 1, *size)))
        finest = decoded[-1]
        upsampled = [F.interpolate(d, size=finest.shape[2:], mode=mode, align_corners=False) for d in decoded[:-1]]
        hypercolumn = torch.cat([*upsampled, finest], dim=1)
        assert hypercolumn.shape[1] == sum(channels)
        literal = F.interpolate(head.out(head.reduce(hypercolumn)), scale_factor=2.0, mode=mode, align_corners=False)
        torch.testing.assert_close(head(decoded), literal, rtol=1e-4, atol=1e-5)
        assert literal.shape[2:] == size


def test_hypercolumn_flag_switches_fusion():
    with_fusion = SCSEUNet(hypercolumn=True)
    without = SCSEUNet(hypercolumn=False)
    assert with_fusion.seg_head.reduce.conv.in_channels == 256 + 128 + 64 + 32 + 16
    assert without.seg_head.reduce.conv.in_channels == 16
    with torch.no_grad():
        assert without.eval()(torch.randn(1, 1, 64, 64)).seg.shape == (1, 1, 64, 64)


def test_encoder_scse_flag_removes_only_the_encoder_attention():
    torch.manual_seed(0)
    full = SCSEUNet(decoder_channels=SMALL_DECODER)
    torch.manual_seed(0)
    plain = SCSEUNet(decoder_channels=SMALL_DECODER, encoder_scse=False)
    assert all(isinstance(m, SCSEBlock) for m in full.encoder.scse)
    assert not any(isinstance(m, SCSEBlock) for m in plain.encoder.modules())
    assert all(isinstance(b.scse, SCSEBlock) for b in plain.decoder.blocks)  # the decoder keeps its scSE
    # the encoder is then exactly the ResNet34 trunk: its stage outputs are the trunk's
    x = torch.randn(1, 1, 64, 64)
    plain.eval()
    with torch.no_grad():
        features = plain.encoder(x)
        e = plain.encoder
        stem = e.act(e.bn1(e.conv1(x)))
        torch.testing.assert_close(features[0], stem)
        torch.testing.assert_close(features[4], e.layer4(e.layer3(e.layer2(e.layer1(e.maxpool(stem))))))
    removed = sum(p.numel() for p in full.encoder.scse.parameters())
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert removed > 0 and count(full) - count(plain) == removed


@pytest.mark.parametrize("kwargs", [{"encoder_scse": False}, {"hypercolumn": False}])
def test_ablation_switches_travel_with_the_model_record(kwargs):
    from pneumoseg.model_record import ModelRecord, describe_network

    net = SCSEUNet(decoder_channels=SMALL_DECODER, **kwargs)
    record = ModelRecord.from_dict(ModelRecord.for_training(net, image_size=64).to_dict())
    assert {k: record.network.kwargs[k] for k in kwargs} == kwargs
    rebuilt = record.network.build()
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    assert describe_network(rebuilt) == describe_network(net)


def _backward_once(net: SCSEUNet) -> None:
    x = torch.randn(2, 1, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 10:30, 20:40] = 1
    out = net(x)
    FusedMultiTaskLoss()(out.seg, out.cls, mask).total.backward()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    # reduction 4 keeps every scSE bottleneck >= 4 units: with the default r=16 the 16-channel last
    # decoder block has a 1-unit bottleneck whose ReLU may be inactive for a given batch (zero grad)
    net = SCSEUNet(reduction=4)
    _backward_once(net)
    dead = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []
    default = SCSEUNet()
    _backward_once(default)
    assert [n for n, p in default.named_parameters() if p.grad is None] == []  # all wired into the graph


def test_overfits_one_tiny_batch():
    torch.manual_seed(0)
    net = SCSEUNet()
    loss_fn = FusedMultiTaskLoss()
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 10:30, 5:25] = 1
    x = torch.randn(2, 1, 64, 64) * 0.3 + mask
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(80):
        out = net(x)
        loss = loss_fn(out.seg, out.cls, mask).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 10, losses[::10]


def test_scripted_and_traced_segmentation_view_equal_eager():
    torch.manual_seed(0)
    view = SegmentationView(SCSEUNet()).eval()
    scripted = torch.jit.script(view)
    traced = torch.jit.trace(view, torch.randn(1, 1, 128, 128))
    with torch.no_grad():
        x = torch.randn(2, 1, 128, 128)
        torch.testing.assert_close(scripted(x), view(x))
        torch.testing.assert_close(traced(x), view(x))
        odd = torch.randn(1, 1, 100, 90)  # scripting keeps the pad/crop logic dynamic
        torch.testing.assert_close(scripted(odd), view(odd))


def test_segmentation_view_shares_parameters():
    net = SCSEUNet()
    view = SegmentationView(net)
    assert {id(p) for p in view.parameters()} == {id(p) for p in net.parameters()}


# ---------------------------------------------------------------------------------------------
# Loading a torchvision-layout resnet34 checkpoint
# ---------------------------------------------------------------------------------------------
def torchvision_resnet34_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ``resnet34`` key names and shapes, built from its documented
    layout (torchvision is deliberately not a dependency): stem, layers 3-4-6-3, fc 512 -> 1000."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        state[f"{prefix}.weight"] = torch.rand(c, generator=gen)
        state[f"{prefix}.bias"] = torch.randn(c, generator=gen)
        state[f"{prefix}.running_mean"] = torch.randn(c, generator=gen)
        state[f"{prefix}.running_var"] = torch.rand(c, generator=gen) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(100)

    state["conv1.weight"] = torch.randn(64, 3, 7, 7, generator=gen)
    bn("bn1", 64)
    in_c = 64
    for layer, (blocks, out_c) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            state[f"{p}.conv1.weight"] = torch.randn(out_c, in_c if b == 0 else out_c, 3, 3, generator=gen)
            bn(f"{p}.bn1", out_c)
            state[f"{p}.conv2.weight"] = torch.randn(out_c, out_c, 3, 3, generator=gen)
            bn(f"{p}.bn2", out_c)
            if b == 0 and layer > 1:
                state[f"{p}.downsample.0.weight"] = torch.randn(out_c, in_c, 1, 1, generator=gen)
                bn(f"{p}.downsample.1", out_c)
        in_c = out_c
    state["fc.weight"] = torch.randn(1000, 512, generator=gen)
    state["fc.bias"] = torch.randn(1000, generator=gen)
    return state


def test_encoder_strict_loads_torchvision_checkpoint(tmp_path):
    state = torchvision_resnet34_state_dict()
    path = tmp_path / "resnet34.pth"
    torch.save(state, path)
    net = SCSEUNet(in_channels=3, pretrained_path=path)
    loaded = net.encoder.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        torch.testing.assert_close(loaded[key], value, msg=key)


def test_single_channel_stem_is_the_sum_over_rgb(tmp_path):
    state = torchvision_resnet34_state_dict()
    path = tmp_path / "resnet34.pth"
    torch.save({"state_dict": state}, path)  # wrapped checkpoints are accepted too
    net = SCSEUNet(in_channels=1, pretrained_path=path)
    torch.testing.assert_close(net.encoder.conv1.weight.detach(), state["conv1.weight"].sum(1, keepdim=True))
    # a grey image through the adapted stem == the same image as RGB through the original stem
    grey = torch.randn(1, 1, 32, 32)
    rgb_out = torch.nn.functional.conv2d(grey.repeat(1, 3, 1, 1), state["conv1.weight"], stride=2, padding=3)
    with torch.no_grad():
        torch.testing.assert_close(net.encoder.conv1(grey), rgb_out, rtol=1e-4, atol=1e-4)


def test_partial_or_wrong_checkpoint_is_a_clear_error(tmp_path):
    state = torchvision_resnet34_state_dict()
    del state["layer3.2.bn1.running_var"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \['layer3\.2\.bn1\.running_var'\].*layer5\.0\.conv1"):
        SCSEUNet(in_channels=3, pretrained_path=path)

    wrong = torchvision_resnet34_state_dict()
    wrong["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: checkpoint \(64, 64, 5, 5\)"):
        SCSEUNet(in_channels=3, pretrained_path=path)

    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        SCSEUNet(pretrained_path=tmp_path / "no_such.pth")
