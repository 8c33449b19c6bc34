"""AG-CNN model, backbones and attention blocks: shapes, identity at start, pretrained loading."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from agcnn.config import ModelConfig
from agcnn.models import AGCNN, create_attention, create_backbone
from agcnn.models.backbones import AttentiveBasicBlock, ResNetFeatures, attention_keys, load_pretrained


@pytest.mark.parametrize(
    "backbone,attention,size,channels",
    [
        ("resnet18", "none", 64, 512),
        ("resnet18", "se", 64, 512),
        ("resnet18", "self", 64, 512),
        ("resnet18", "mhsa", 96, 512),
        ("resnet50", "none", 64, 2048),
        ("densenet121", "se", 64, 1024),
        ("densenet121", "self", 64, 1024),
    ],
)
def test_backbone_feature_shapes(backbone, attention, size, channels):
    net = create_backbone(backbone, attention).eval()
    with torch.no_grad():
        fmap = net(torch.randn(2, 3, size, size))
    assert fmap.shape == (2, channels, size // 32, size // 32)
    assert net.num_features == channels


@pytest.mark.parametrize("kind", ["se", "self", "mhsa"])
def test_attention_blocks_start_as_identity(kind):
    block = create_attention(kind, 64).eval()
    x = torch.randn(2, 64, 9, 9)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize("backbone,kind", [("resnet18", "se"), ("resnet18", "self"), ("resnet18", "mhsa"), ("densenet121", "se")])
def test_attention_leaves_pretrained_network_unchanged_at_step0(backbone, kind):
    torch.manual_seed(0)
    plain = create_backbone(backbone, "none").eval()
    attn = create_backbone(backbone, kind).eval()
    result = attn.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    # Only the attention blocks' own weights are new (a norm's step counter is not reported missing).
    assert result.missing_keys and set(result.missing_keys) <= attention_keys(attn)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), plain(x))


def test_a_backbone_takes_attention_as_constructors():
    seen = []

    def gate(channels: int) -> torch.nn.Module:
        seen.append(channels)
        return torch.nn.Identity()

    ResNetFeatures(AttentiveBasicBlock, [2, 2, 2, 2], channel_attn=gate)
    assert seen == [64, 64, 128, 128, 256, 256, 512, 512]  # every block's output
    seen.clear()
    ResNetFeatures(AttentiveBasicBlock, [2, 2, 2, 2], spatial_attn=gate)
    assert seen == [512, 512]  # after the 3x3 convolutions of the last stage only


def test_attention_blocks_learn_away_from_identity():
    block = create_attention("se", 32)
    x = torch.randn(4, 32, 5, 5)
    block(x).pow(2).sum().backward()
    assert block.fc2.weight.grad.abs().sum() > 0


def test_unknown_names_suggest_the_nearest():
    with pytest.raises(ValueError, match="Did you mean 'se'"):
        create_attention("sse", 8)
    with pytest.raises(ValueError, match="Did you mean 'resnet50'"):
        create_backbone("resnet5")
    with pytest.raises(ValueError, match="valid: max, avg"):
        AGCNN(14, backbone="resnet18", pool="mean")


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("stage", ["global", "local", "fusion"])
def test_agcnn_outputs_for_each_stage(pool, stage):
    model = AGCNN(14, backbone="resnet18", pool=pool, image_size=64, local_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        g = model(x, stage="global")
        out = model(x, stage=stage)
    assert out.global_logits.shape == (3, 14)
    torch.testing.assert_close(out.global_logits, g.global_logits)
    if stage == "global":
        assert out.local_logits is out.fusion_logits is out.boxes is out.heatmap is None
        with pytest.raises(ValueError, match="not computed"):
            out.logits("fusion")
        return
    assert out.local_logits.shape == out.fusion_logits.shape == (3, 14)
    assert out.boxes.shape == (3, 4) and out.heatmap.shape == (3, 2, 2)
    assert out.global_pooled.shape == out.local_pooled.shape == (3, 512)
    assert [out.logits(b) is getattr(out, f"{b}_logits") for b in ("global", "local", "fusion")] == [True] * 3


def test_the_model_returns_logits_not_probabilities():
    torch.manual_seed(0)
    model = AGCNN(14, backbone="resnet18", image_size=64, local_size=64).eval()
    with torch.no_grad():
        # Biases far from 0: a sigmoid anywhere would squash these into (0, 1).
        model.global_branch.classifier.bias.fill_(20.0)
        model.local_branch.classifier.bias.fill_(-20.0)
        model.fusion.bias.fill_(-20.0)
        out = model(torch.randn(3, 3, 64, 64))
    assert (out.global_logits > 1).all() and (out.local_logits < 0).all() and (out.fusion_logits < 0).all()
    # Each is the branch's linear head on its pool5 features, and nothing after it.
    torch.testing.assert_close(out.global_logits, model.global_branch.classifier(out.global_pooled))
    torch.testing.assert_close(out.local_logits, model.local_branch.classifier(out.local_pooled))
    torch.testing.assert_close(out.fusion_logits, model.fusion(torch.cat([out.global_pooled, out.local_pooled], 1)))


def test_highres_input_feeds_the_global_branch_downsampled():
    model = AGCNN(14, backbone="resnet18", image_size=64, local_size=64).eval()
    hi = torch.randn(2, 3, 128, 128)
    lo = torch.nn.functional.interpolate(hi, size=64, mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(model(hi, "global").global_logits, model(lo, "global").global_logits)
        out = model(hi)
    # Boxes stay on the 64-px global grid.
    assert (out.boxes[:, 2:] <= 64).all()


def test_branches_do_not_share_weights():
    model = AGCNN(14, backbone="resnet18", image_size=64)
    g = dict(model.global_branch.named_parameters())
    for name, p in model.local_branch.named_parameters():
        assert p.data_ptr() != g[name].data_ptr()
    assert model.fusion.in_features == 2 * 512


def test_gradients_reach_local_branch_not_through_boxes():
    model = AGCNN(14, backbone="resnet18", image_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    out.local_logits.sum().backward()
    assert model.local_branch.classifier.weight.grad is not None
    assert not out.boxes.requires_grad


def test_bad_input_shape_is_rejected():
    model = AGCNN(14, backbone="resnet18", image_size=64)
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        model(torch.randn(2, 1, 64, 64))


def _torchvision_resnet18_file(tmp_path):
    torch.manual_seed(1)
    ref = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_output_stride_16_keeps_the_weights_and_doubles_the_map(backbone):
    coarse = create_backbone(backbone, width=16).eval()
    fine = create_backbone(backbone, width=16, output_stride=16).eval()
    # Same parameters, same shapes: either loads the other's (and ImageNet's) weights.
    fine.load_state_dict(coarse.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = coarse(x), fine(x)
        # Up to layer4 nothing changes; layer4 keeps its input's 4 x 4 grid.
        stem = lambda n: n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x)))))))  # noqa: E731
        torch.testing.assert_close(stem(coarse), stem(fine))
    assert a.shape == (2, coarse.num_features, 2, 2) and b.shape == (2, coarse.num_features, 4, 4)
    with pytest.raises(ValueError, match="output_stride"):
        create_backbone("densenet121", output_stride=16)
    with pytest.raises(ValueError, match="32 or 16"):
        create_backbone(backbone, width=16, output_stride=8)


def test_global_stride_refines_the_heatmap_not_the_local_branch():
    model = AGCNN.from_config(ModelConfig(backbone="resnet18", width=8, global_stride=16, local_size=64), num_classes=3, image_size=128)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = model(x, stage="fusion")
        assert out.heatmap.shape == (2, 8, 8)
        assert model.local_branch.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 2


def test_pretrained_weights_load_from_local_file(tmp_path):
    ref, path = _torchvision_resnet18_file(tmp_path)
    ref.eval()
    net = create_backbone("resnet18", "se").eval()
    info = load_pretrained(net, path)
    assert info["dropped"] == ["fc.bias", "fc.weight"]
    assert info["missing"] and set(info["missing"]) == attention_keys(net)
    assert len(info["sha256"][0]) == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(ref.children())[:-2])
        torch.testing.assert_close(net(x), trunk(x))


def test_pretrained_from_config_loads_both_branches(tmp_path):
    _, path = _torchvision_resnet18_file(tmp_path)
    cfg = ModelConfig(backbone="resnet18", pretrained=str(path))
    model = AGCNN.from_config(cfg, num_classes=14, image_size=64)
    torch.testing.assert_close(model.global_branch.features.conv1.weight, model.local_branch.features.conv1.weight)


def test_pretrained_errors(tmp_path):
    net = create_backbone("resnet18")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(net, tmp_path / "missing.pth")
    wrong = tmp_path / "r50.pth"
    torch.save(create_backbone("resnet50").state_dict(), wrong)
    with pytest.raises(ValueError, match="do not match this backbone"):
        load_pretrained(net, wrong)
    # A file without some of the backbone's own weights (not attention blocks) is refused.
    _, path = _torchvision_resnet18_file(tmp_path)
    partial = torch.load(path, weights_only=True)
    del partial["layer4.1.bn2.running_mean"]
    torch.save(partial, path)
    with pytest.raises(ValueError, match=r"missing \['layer4.1.bn2.running_mean'\]"):
        load_pretrained(create_backbone("resnet18", "se"), path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(net, junk)


def test_fusion_head_can_start_as_the_global_classifier():
    model = AGCNN(14, backbone="resnet18", image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        assert not torch.allclose(before.fusion_logits, before.global_logits)
        model.init_fusion_from_global()
        after = model(x)
    torch.testing.assert_close(after.fusion_logits, after.global_logits)
    # The local half starts at zero but is trainable: it receives a gradient.
    model.fuse(after.global_pooled, after.local_pooled).sum().backward()
    assert model.fusion.weight.grad[:, 512:].abs().sum() > 0


@pytest.mark.parametrize("backbone,width,channels", [("resnet18", 16, 128), ("resnet50", 16, 512), ("resnet18", 64, 512)])
def test_resnet_width_scales_every_stage(backbone, width, channels):
    net = create_backbone(backbone, "se", width=width).eval()
    with torch.no_grad():
        fmap = net(torch.randn(2, 3, 64, 64))
    assert fmap.shape == (2, channels, 2, 2) and net.num_features == channels
    assert net.conv1.out_channels == width and net.layer2[0].conv1.in_channels == width * (4 if backbone == "resnet50" else 1)
    # Same parameter names as torchvision's ResNet at any width.
    ref = {k for k in resnet18().state_dict() if not k.startswith("fc.")}
    if backbone == "resnet18":
        assert ref <= set(net.state_dict())
    model = AGCNN.from_config(ModelConfig(backbone="resnet18", width=16, pool="avg"), num_classes=3, image_size=64)
    assert model.fusion.in_features == 2 * 128
    with pytest.raises(ValueError, match="width"):
        create_backbone("densenet121", width=32)


def test_no_finding_output_is_kept_apart_from_the_findings():
    cfg = ModelConfig(backbone="resnet18", local_size=64, no_finding=True)
    torch.manual_seed(0)
    model = AGCNN.from_config(cfg, num_classes=14, image_size=64).eval()
    assert model.fusion.out_features == model.global_branch.classifier.out_features == 15
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
        pooled = model.global_branch.pool_features(model.global_branch.forward_features(torch.randn(1, 3, 64, 64)))
    for b in ("global", "local", "fusion"):
        # The 14 findings in the label order everywhere outputs are read; the 15th apart.
        assert out.logits(b).shape == (2, 14)
        full = out.logits(b, with_no_finding=True)
        assert full.shape == (2, 15) and torch.equal(full[:, :14], out.logits(b)) and torch.equal(full[:, 14], out.no_finding[b])
    torch.testing.assert_close(out.logits("fusion", with_no_finding=True), model.fuse(out.global_pooled, out.local_pooled))
    assert model.findings(model.global_branch.forward_head(pooled)).shape == (1, 14)
    # Without the option nothing changes: 14 outputs, with_no_finding is a no-op.
    plain = AGCNN.from_config(ModelConfig(backbone="resnet18", local_size=64), num_classes=14, image_size=64).eval()
    with torch.no_grad():
        out = plain(torch.randn(1, 3, 64, 64))
    assert out.no_finding is None and out.logits("fusion", with_no_finding=True).shape == (1, 14)


def _two_spots() -> torch.Tensor:
    """[1, 2, 4, 4] features: channel 0 very strong at (0, 0), channel 1 moderate at (3, 2)."""
    f = torch.zeros(1, 2, 4, 4)
    f[0, 0, 0, 0] = 10.0
    f[0, 1, 3, 2] = 1.0
    return f


def test_class_activation_heatmap_follows_the_classifier_not_the_strongest_channel():
    from agcnn.models.roi import attention_heatmap, class_activation_heatmap

    f = _two_spots()
    assert attention_heatmap(f)[0].argmax().item() == 0  # the paper's: the strongest channel
    # Class 0 reads channel 1 only; class 1 reads channel 0 with a negative weight (evidence
    # against a finding is not attention).
    w = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    hm = class_activation_heatmap(f, w)[0]
    assert hm.argmax().item() == 3 * 4 + 2 and hm.max().item() == 1.0 and hm.min().item() == 0.0
    torch.testing.assert_close(hm, (f[0, 1] * 2.0) / 2.0)
    with pytest.raises(ValueError, match="share C"):
        class_activation_heatmap(f, torch.zeros(3, 5))


def test_uncertainty_heatmap_goes_to_the_finding_the_branch_is_unsure_of():
    from agcnn.models.roi import class_activation_heatmap, uncertainty_heatmap

    f = _two_spots()
    # Class 0 reads the strong spot (channel 0), class 1 the weak one (channel 1).
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert class_activation_heatmap(f, w)[0].argmax().item() == 0
    sure_of_0 = uncertainty_heatmap(f, w, torch.tensor([[8.0, 0.0]]))[0]
    assert sure_of_0.argmax().item() == 3 * 4 + 2 and sure_of_0.max().item() == 1.0
    # Sure that class 1 is absent: back to the strong spot.
    assert uncertainty_heatmap(f, w, torch.tensor([[0.0, -8.0]]))[0].argmax().item() == 0
    # Negative evidence cancels positive at the same place before the negative part is dropped.
    hm = uncertainty_heatmap(f, torch.tensor([[1.0, 0.0], [-20.0, 0.0]]), torch.zeros(1, 2))[0]
    assert hm.max().item() == 0.0
    with pytest.raises(ValueError, match="logits must be"):
        uncertainty_heatmap(f, w, torch.zeros(1, 3))


def test_uncertainty_heatmap_is_grad_cam_of_the_summed_probabilities():
    from agcnn.models.roi import attention_heatmap, uncertainty_heatmap

    torch.manual_seed(0)
    f = torch.randn(3, 6, 5, 5, requires_grad=True)
    w, b = torch.randn(4, 6), torch.randn(4)
    logits = f.mean(dim=(2, 3)) @ w.T + b  # average pooling, then the linear classifier
    torch.sigmoid(logits).sum().backward()
    # Grad-CAM: channel weights = spatially averaged gradients; weighted sum of the maps; ReLU.
    alpha = f.grad.mean(dim=(2, 3))
    gradcam = torch.relu((alpha[:, :, None, None] * f.detach()).sum(1, keepdim=True))
    torch.testing.assert_close(uncertainty_heatmap(f, w, logits), attention_heatmap(gradcam))


def test_cam_heatmap_uses_the_findings_rows_of_the_global_classifier():
    from agcnn.models.roi import attention_heatmap, class_activation_heatmap

    torch.manual_seed(0)
    model = AGCNN(2, backbone="resnet18", width=8, heatmap="cam", image_size=128, local_size=32, no_finding=True).eval()
    with torch.no_grad():
        # The "No Finding" row (2) reads every channel strongly: were it used, it would win everywhere.
        model.global_branch.classifier.weight[2] = 10.0
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = model(x, stage="fusion")
        g_map = model.global_branch.forward_features(model.global_input(x))
    w = model.global_branch.classifier.weight
    torch.testing.assert_close(out.heatmap, class_activation_heatmap(g_map, w[:2]))
    assert not torch.allclose(out.heatmap, class_activation_heatmap(g_map, w))
    assert not torch.allclose(out.heatmap, attention_heatmap(g_map))
    with pytest.raises(ValueError, match="heatmap"):
        AGCNN(2, backbone="resnet18", width=8, heatmap="gradcam")


def test_uncertain_heatmap_reads_the_global_findings_probabilities():
    from agcnn.models.roi import uncertainty_heatmap

    torch.manual_seed(0)
    model = AGCNN(2, backbone="resnet18", width=8, heatmap="uncertain", image_size=128, local_size=32, no_finding=True).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = model(x, stage="fusion")
        g_map = model.global_branch.forward_features(model.global_input(x))
    w = model.global_branch.classifier.weight
    torch.testing.assert_close(out.heatmap, uncertainty_heatmap(g_map, w[:2], out.global_logits))
    assert out.boxes.shape == (2, 4)
