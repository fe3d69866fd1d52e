"""Every registered model builds, runs on its data config's input and round-trips a state_dict.

The main tests are parametrized over `list_models()`, so a new architecture is tested the
moment it is registered; `test_kwargs` on its entry keep heavy models quick.
"""

import inspect
import re
import runpy
from pathlib import Path

import pytest
import torch
import torchvision

from model_defs import get_entry, get_model, list_models, register_model
from model_defs.transfer import TRANSFER, TRANSFER_MODELS

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
# Builds that take seconds each on the 2-core CPU machine, even with their test_kwargs (measured:
# 2 to 35 s for a build and a forward pass): their cases are `slow`, every other test here is
# `unit` (marked one by one, as a module mark would make the heavy cases `unit` too), so that
# `-m unit` stays quick. The full suite still builds them all.
HEAVY = {
    "convnext_tiny",
    "deeplabv3_mobilenet_v3",
    "deeplabv3_resnet50",
    "fasterrcnn_mobilenet_320",
    "fasterrcnn_resnet50",
    "fcos_regnet_x_400mf",
    "lraspp_mobilenet_v3",
    "resnet18",
    "resnet50",
    "vit_b_16",
}


def models(*tasks: str) -> list:
    """The registered names of `tasks` as test cases, `slow` for the HEAVY ones, else `unit`."""
    return [pytest.param(n, id=n, marks=speed(n)) for t in tasks for n in list_models(t)]


def speed(name: str):
    return pytest.mark.slow if name in HEAVY else pytest.mark.unit


def build(name: str, **extra) -> tuple[torch.nn.Module, dict]:
    """The model in eval mode, and the keyword arguments it was built from."""
    kwargs = {"num_classes": NUM_CLASSES, **get_entry(name).test_kwargs, **extra}
    return get_model(name, **kwargs).eval(), kwargs


def random_batch(name: str, channels: int | None = None, size: int | None = None) -> torch.Tensor:
    config = get_entry(name).data_config
    channels = channels or config.channels
    size = size or config.input_size
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", models("classification"))
def test_forward_and_state_dict_round_trip(name, tmp_path):
    model, kwargs = build(name)
    x = random_batch(name)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES)

    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    rebuilt = get_model(name, **kwargs).eval()
    rebuilt.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


@pytest.mark.parametrize("name", models("classification"))
def test_grey_input(name):
    model, _ = build(name, in_channels=1)
    with torch.no_grad():
        out = model(random_batch(name, channels=1))
    assert out.shape == (2, NUM_CLASSES)


@pytest.mark.unit
@pytest.mark.parametrize("size", [28, 32, 64])
def test_small_cnn_any_input_size(size):
    model, _ = build("small_cnn")
    with torch.no_grad():
        assert model(random_batch("small_cnn", size=size)).shape == (2, NUM_CLASSES)


def layer_names_cases() -> list:
    """Every registered model that names a layer, with small keyword arguments (and grey input where it takes it)."""
    cases = []
    for name in list_models():
        entry = get_entry(name)
        if entry.stem or entry.head:
            kwargs = dict(entry.test_kwargs)
            if entry.task in ("classification", "segmentation"):
                kwargs |= {"num_classes": NUM_CLASSES, "in_channels": 1}
            if name in TRANSFER:
                kwargs["freeze_backbone"] = True
            cases.append(pytest.param(name, kwargs, id=name, marks=speed(name)))
    return cases


@pytest.mark.unit
def test_every_classifier_names_its_stem_and_head():
    classifiers = list_models("classification")
    assert {spec.name for spec in TRANSFER_MODELS} <= set(classifiers)
    assert [n for n in classifiers if not (get_entry(n).stem and get_entry(n).head)] == []


@pytest.mark.parametrize(("name", "kwargs"), layer_names_cases())
def test_registry_layer_names_are_in_the_state_dict(name, kwargs):
    """The first conv and the classifier an entry names are in its model's state_dict, and are
    the layers tools expect: the conv takes the image's channels, the head gives the classes
    (and is all that a frozen transfer-learning model trains)."""
    entry = get_entry(name)
    model = get_model(name, **kwargs)
    keys = set(model.state_dict())
    if entry.stem:
        assert f"{entry.stem}.weight" in keys
        stem = model.get_submodule(entry.stem)
        assert isinstance(stem, torch.nn.Conv2d)
        assert stem.in_channels == kwargs.get("in_channels", entry.data_config.channels)
    if entry.head:
        assert {f"{entry.head}.weight", f"{entry.head}.bias"} <= keys
        head = model.get_submodule(entry.head)
        assert isinstance(head, (torch.nn.Linear, torch.nn.Conv2d))
        assert head.weight.shape[0] == NUM_CLASSES
    if kwargs.get("freeze_backbone"):
        trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"{entry.head}.weight", f"{entry.head}.bias"}


@pytest.mark.unit
def test_unknown_name_lists_registered_models():
    with pytest.raises(KeyError) as excinfo:
        get_model("no_such_model")
    message = str(excinfo.value)
    assert "no_such_model" in message
    for name in list_models():
        assert name in message


@pytest.mark.unit
def test_duplicate_name_is_refused():
    original = get_entry("small_cnn").builder
    with pytest.raises(ValueError, match="small_cnn"):
        register_model("small_cnn", task="classification")(lambda **kwargs: torch.nn.Identity())
    assert get_entry("small_cnn").builder is original


@pytest.mark.unit
def test_vit_small_rejects_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="divisible"):
        get_model("vit_small", image_size=30, patch_size=4)


@pytest.fixture
def resnet18_weights(tmp_path) -> Path:
    """A torchvision-format (1000-class) ResNet-18 state_dict file, as downloaded weights would be."""
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.mark.unit
def test_resnet18_transfer_learning(resnet18_weights):
    saved = torch.load(resnet18_weights, weights_only=True)
    model = get_model("resnet18", num_classes=5, weights_path=str(resnet18_weights), freeze_backbone=True)

    assert torch.equal(model.layer3[1].conv2.weight, saved["layer3.1.conv2.weight"])
    assert torch.equal(model.bn1.running_mean, saved["bn1.running_mean"])
    assert model.fc.out_features == 5
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    with torch.no_grad():
        assert model.eval()(random_batch("resnet18")).shape == (2, 5)


@pytest.mark.unit
def test_resnet18_transfer_learning_grey(resnet18_weights):
    saved = torch.load(resnet18_weights, weights_only=True)
    model = get_model("resnet18", num_classes=5, in_channels=1, weights_path=str(resnet18_weights))
    # Averaged over the RGB inputs and scaled by 3, so a grey image acts as it did in RGB.
    expected = saved["conv1.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.conv1.weight, expected)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.unit
@pytest.mark.parametrize("spec", TRANSFER_MODELS, ids=lambda s: s.name)
def test_transfer_builder_signature(spec):
    """Each table row's builder takes the common arguments plus its own options (what training
    checks --model-arg against), and refuses others."""
    params = inspect.signature(get_entry(spec.name).builder).parameters
    assert list(params) == ["num_classes", "in_channels", "weights_path", "freeze_backbone", *spec.options]
    with pytest.raises(TypeError, match="no_such_arg"):
        get_model(spec.name, no_such_arg=1)


@pytest.mark.unit
def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "not_there.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        get_model("resnet18", weights_path=str(missing))


@pytest.mark.unit
def test_mismatched_weights_file_is_named(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"not_a_resnet_key": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=re.escape(str(wrong))):
        get_model("resnet18", weights_path=str(wrong))


@pytest.mark.unit
def test_cli_lists_every_model(capsys):
    runpy.run_module("model_defs", run_name="__main__")  # python -m model_defs, in this process
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list_models())
    for line, name in zip(lines, list_models()):
        fields = line.split("\t")
        assert fields[:2] == [name, get_entry(name).task]


# -- segmentation, generation and embedding models: a forward check per task -------------


def task_input_and_output(name: str, model: torch.nn.Module) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A random input batch of 2 for the model and the output shape its task promises."""
    entry = get_entry(name)
    cfg = entry.data_config
    if entry.task == "generation":  # latent vectors -> images of the data config's size
        return torch.randn(2, model.latent_dim), (2, cfg.channels, cfg.input_size, cfg.input_size)
    x = random_batch(name)
    if entry.task == "segmentation":  # per-pixel logits at the input's size
        return x, (2, NUM_CLASSES, cfg.input_size, cfg.input_size)
    return x, (2, model.feature_dim)  # embedding: one vector per image


@pytest.mark.parametrize("name", models("segmentation", "generation", "embedding"))
def test_segmentation_generation_embedding_forward_and_round_trip(name, tmp_path):
    entry = get_entry(name)
    kwargs = dict(entry.test_kwargs)
    if entry.task == "segmentation":
        kwargs["num_classes"] = NUM_CLASSES
    model = get_model(name, **kwargs).eval()
    x, expected = task_input_and_output(name, model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    rebuilt = get_model(name, **kwargs).eval()
    rebuilt.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


# -- detection models: torchvision-style list input, boxes and losses ---------------------


@pytest.mark.parametrize("name", models("detection"))
def test_detection_forward_losses_and_round_trip(name, tmp_path):
    kwargs = {"num_classes": NUM_CLASSES, **get_entry(name).test_kwargs}
    size = kwargs["image_size"]
    torch.manual_seed(0)
    model = get_model(name, **kwargs).train()
    images = [torch.rand(3, size, size * 3 // 4), torch.rand(3, size // 2, size)]  # longer side = image_size
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 5.0, 90.0, 50.0], [2.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([3, 2])},
    ]
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, x in zip(out, images):
        assert set(o) >= {"boxes", "scores", "labels"} and o["boxes"].shape[1:] == (4,)
        assert ((o["labels"] >= 1) & (o["labels"] <= NUM_CLASSES)).all()  # 0 is the background
        assert (o["boxes"][:, 2] <= x.shape[2] + 1e-3).all() and (o["boxes"][:, 3] <= x.shape[1] + 1e-3).all()
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    rebuilt = get_model(name, **kwargs).eval()
    rebuilt.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        again = rebuilt(images)
    for a, b in zip(out, again):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
