"""PatchCore (training.models.patchcore): local backbone weights, a fitted memory bank, scores that do not depend on
the batch, a state dict that reloads, and an ONNX export that scores what the checkpoint scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectops.training.models.patchcore import ANOMALY_MODELS, PatchCore, create_anomaly_model
from defectops.training.models.pretrained import SOURCES, WeightsError

SIZE = (48, 80)  # H, W: not square, as KolektorSDD's parts are not


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth 'good parts': a horizontal gradient with mild noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, SIZE[1]).view(1, 1, 1, -1).expand(n, 3, SIZE[0], SIZE[1])
    return (ramp + 0.02 * torch.randn(n, 3, *SIZE, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def fitted() -> PatchCore:
    model = create_anomaly_model("patchcore_effnet_lite0")
    model.fit([_images(4, s) for s in range(3)], coreset_ratio=0.25, max_bank=200, seed=0)
    return model


def test_registry_entries_load_their_weights_from_a_package_file() -> None:
    for name, spec in ANOMALY_MODELS.items():
        assert spec.weights in SOURCES, name
    model = create_anomaly_model("patchcore_effnet_lite0")
    assert model.weights_info["weights_sha256"] == SOURCES["efficientnet-lite0"].sha256
    with pytest.raises(ValueError, match="unknown anomaly model"):
        create_anomaly_model("patchcore_nope")
    with pytest.raises(ValueError, match=r"blocks\.3 are not feature stages .* choose from .*blocks\.4"):
        create_anomaly_model("patchcore_effnet_lite0", layers=("blocks.2", "blocks.3"), pretrained=False)


def test_a_users_weights_file_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pt"
    torch.save({"conv_stem.weight": torch.zeros(3, 3, 3, 3)}, bad)
    with pytest.raises(WeightsError, match="do not fit"):
        create_anomaly_model("patchcore_effnet_lite0", weights=str(bad))


def test_fit_keeps_a_capped_coreset_of_the_good_patches(fitted: PatchCore) -> None:
    bank = fitted.memory_bank
    assert bank.shape == (min(200, int(12 * 6 * 10 * 0.25)), 152)  # 12 images x (48/8 x 80/8) patches, 40+112 dims
    empty = create_anomaly_model("patchcore_effnet_lite0", pretrained=False)
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        empty(_images(1, 0))


def test_defects_score_higher_and_the_map_points_at_them(fitted: PatchCore) -> None:
    good = _images(3, 10)
    bad = good.clone()
    bad[:, :, 20:30, 30:42] = 0.0  # a dark blotch
    s_good, _ = fitted(good)
    s_bad, maps = fitted(bad)
    assert maps.shape == (3, 1, *SIZE)
    assert bool((s_bad > s_good.max()).all())
    inside = maps[:, 0, 20:30, 30:42].mean()
    outside = maps[:, 0, :10, :20].mean()
    assert float(inside) > float(outside)


def test_scores_do_not_depend_on_the_batch(fitted: PatchCore) -> None:
    x = _images(6, 20)
    together, maps = fitted(x)
    alone = torch.cat([fitted(x[i:i + 1])[0] for i in range(6)])
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-4)
    assert torch.allclose(maps[2:3], fitted(x[2:3])[1], rtol=1e-5, atol=1e-4)


def test_state_dict_reloads_into_a_fresh_model(fitted: PatchCore) -> None:
    fresh = create_anomaly_model("patchcore_effnet_lite0", pretrained=False)
    fresh.load_state_dict(fitted.state_dict())
    x = _images(2, 30)
    assert torch.equal(fresh(x)[0], fitted(x)[0])


def test_onnx_export_scores_like_the_checkpoint(fitted: PatchCore, tmp_path: Path) -> None:
    from defectops.serving.onnx_export import export_onnx, onnx_session

    path = export_onnx(fitted, tmp_path / "patchcore.onnx", input_shape=(3, *SIZE),
                       output_names=("scores", "anomaly_map"))
    session = onnx_session(path)
    x = _images(5, 40)
    scores, maps = session.run(None, {"images": x.numpy()})
    ref_scores, ref_maps = fitted(x)
    assert scores.shape == (5,) and maps.shape == (5, 1, *SIZE)
    assert np.allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-3)
    assert np.allclose(maps, ref_maps.numpy(), rtol=1e-4, atol=1e-3)


def test_onnx_export_of_a_batch_over_anomalib_search_chunk_scores_every_batch_size(
        fitted: PatchCore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """anomalib searches in chunks when a batch has more patches than its chunk size; traced, that loop froze the
    dummy batch's shape into the graph (a batch of 3 failed). With the chunk smaller than the traced batch's patches,
    the export must still score batches of 1, 3 and 7 like the checkpoint."""
    import anomalib.models.image.patchcore.torch_model as anomalib_model

    from defectops.serving.onnx_export import export_onnx, onnx_session

    _, (h, w) = fitted.embed(_images(1, 0))
    monkeypatch.setattr(anomalib_model, "DEFAULT_CHUNK_SIZE", h * w)  # the traced batch of 2: exactly two chunks
    path = export_onnx(fitted, tmp_path / "chunked.onnx", input_shape=(3, *SIZE),
                       output_names=("scores", "anomaly_map"))
    session = onnx_session(path)
    for n in (1, 3, 7):
        x = _images(n, 50 + n)
        scores, maps = session.run(None, {"images": x.numpy()})
        ref_scores, ref_maps = fitted(x)  # eager: anomalib's chunked search
        assert np.allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-3)
        assert np.allclose(maps, ref_maps.numpy(), rtol=1e-4, atol=1e-3)
