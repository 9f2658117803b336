"""python_models.reuse: feature-reuse heat maps of DenseNets and DelugeNets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from python_models import densenet_bc, reuse, train
from python_models.delugenet import DelugeNet


def test_densenet_map_is_the_average_absolute_weight_per_source():
    """Weights set so that every (source, target) pair has a known average |w|."""
    model = densenet_bc(depth=16, growth_rate=3, num_classes=4)  # blocks of 2 layers
    c0, k = 6, 3
    with torch.no_grad():
        block = model.features.denseblock1
        for layer_index, layer in enumerate(block.values(), start=1):
            w = layer.conv1.weight  # [out, c0 + (l-1)k, 1, 1]
            w[:, :c0] = -(10 * layer_index + 0)  # sign must not matter
            for s in range(1, layer_index):
                w[:, c0 + (s - 1) * k : c0 + s * k] = 10 * layer_index + s
        t = model.features.transition1.conv.weight  # [out, c0 + 2k, 1, 1]
        t[:, :c0] = 30
        t[:, c0 : c0 + k] = 31
        t[:, c0 + k :] = 32
    maps = reuse.densenet_maps(model.state_dict())
    assert [m.title for m in maps] == ["dense block 1", "dense block 2", "dense block 3"]
    first = maps[0]
    assert first.sources == ["in", "1", "2"] and first.targets == ["1", "2", "transition"]
    expected = np.array([[10, np.nan, np.nan], [20, 21, np.nan], [30, 31, 32]], dtype=float)
    np.testing.assert_array_equal(first.values, expected)
    assert maps[-1].targets[-1] == "classifier"
    block3_in = model.features.denseblock3.denselayer1.conv1.in_channels
    classifier = model.classifier.weight.detach().double().abs()
    assert maps[-1].values[-1, 0] == pytest.approx(classifier[:, :block3_in].mean().item())


def test_delugenet_map_is_the_mean_absolute_cldc_weight():
    model = DelugeNet((3, 4), (4, 8), 2, num_classes=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("cldc.weight"):
                p.copy_(torch.randn(p.shape))
    maps = reuse.delugenet_maps(model.state_dict())
    assert [m.title for m in maps] == ["stage 1", "stage 2"]
    stage2 = maps[1]
    assert stage2.sources == ["0", "1", "2", "3"] and stage2.targets == ["1", "2", "3", "head"]
    assert np.isnan(stage2.values[0]).all()  # layer 1: a BN on slot 0, no CLDC
    w3 = model.stage2.layer3.cldc.weight.detach().double().abs().mean(dim=0).numpy()
    np.testing.assert_array_equal(stage2.values[2, :3], w3)
    assert np.isnan(stage2.values[2, 3])
    head = model.head.cldc.weight.detach().double().abs().mean(dim=0).numpy()
    np.testing.assert_array_equal(stage2.values[3], head)
    assert maps[0].targets[-1] == "transition"


def test_efficient_and_naive_delugenets_give_the_same_maps():
    torch.manual_seed(0)
    naive = DelugeNet((2, 3), (4, 8), 2, num_classes=3)
    efficient = DelugeNet((2, 3), (4, 8), 2, num_classes=3, efficient=True, backend="reference")
    efficient.load_state_dict(naive.state_dict())
    for a, b in zip(reuse.reuse_maps(naive.state_dict()), reuse.reuse_maps(efficient.state_dict())):
        np.testing.assert_array_equal(a.values, b.values)


def test_command_on_a_tiny_trained_delugenet(tmp_path, capsys):
    torch.manual_seed(0)
    model = DelugeNet((3, 4), (4, 8), 2, num_classes=3, efficient=True, backend="reference")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    # Training moved the CLDC weights away from their 1/S start.
    assert not torch.allclose(model.stage2.layer3.cldc.weight, torch.full((8, 3), 1 / 3))
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    out, data = tmp_path / "reuse.png", tmp_path / "reuse.json"
    assert reuse.main([str(path), "-o", str(out), "--json", str(data)]) == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(data.read_text())
    direct = model.stage2.layer3.cldc.weight.detach().double().abs().mean(dim=0).tolist()
    assert saved[1]["values"][2][:3] == pytest.approx(direct, abs=1e-15)
    assert "2 maps" in capsys.readouterr().out


def test_training_run_draws_the_picture(tmp_path):
    args = train.parse_args(
        [
            "--model",
            "densenet_bc_10",
            "--growth-rate",
            "6",
            "--image-size",
            "8",
            "--quiet",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--out-dir",
            str(tmp_path / "run"),
        ]
    )
    summary = train.run(args)
    picture = tmp_path / "run" / "reuse.png"
    assert summary["reuse_picture"] == str(picture) and picture.read_bytes()[:4] == b"\x89PNG"
    # The command reads the run folder (its newest checkpoint) as well.
    assert reuse.main([str(tmp_path / "run"), "-o", str(tmp_path / "again.png")]) == 0


def test_not_a_model_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.ones(2)}, path)
    assert reuse.main([str(path), "-o", str(tmp_path / "x.png")]) == 2
    assert "not a DenseNet or DelugeNet" in capsys.readouterr().err
    assert reuse.main([str(tmp_path / "missing.pt")]) == 2
