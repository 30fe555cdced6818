"""The model repository: every kind of model.toml is served, and a bad model stops start-up with
one message naming the model and the cause."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from PIL import Image
from support import DEFAULT_MODEL, MODELS, make_settings, photo
from torch import nn
from torchvision import transforms

from app.main import create_app
from app.model.keymaps import KEY_MAPS
from app.model.repository import ModelConfigError, discover
from app.model.runtime import Classifier, build_module

TINY_LABELS = ["red", "green", "blue"]


class TinyNet(nn.Module):
    """A small CNN with the layers whose behaviour differs between train and eval."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def trained_tiny() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    # Give BatchNorm running statistics that are far from the identity, so eval mode matters.
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(16, 3, 32, 32) * 3 + 1)
    return net.eval()


def write_model(
    repo: Path, name: str, model_section: str, extra: str = "", labels=TINY_LABELS
) -> Path:
    folder = repo / name
    folder.mkdir(parents=True)
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "model.toml").write_text(
        f"""
[model]
{model_section}
{extra}
[labels]
file = "labels.txt"

[preprocessing]
resize = 36
crop = 32
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
"""
    )
    return folder


def repository_with_default(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(MODELS / DEFAULT_MODEL, repo / DEFAULT_MODEL)
    return repo


@pytest.fixture
def mixed_repository(tmp_path: Path) -> tuple[Path, dict[str, nn.Module]]:
    """A repository with one model of each kind, and the eager module each was made from."""
    repo = repository_with_default(tmp_path)
    net = trained_tiny()
    folder = write_model(repo, "tiny_script", 'source = "torchscript"\nfile = "model.pt"')
    torch.jit.script(net).save(str(folder / "model.pt"))
    folder = write_model(repo, "tiny_export", 'source = "export"\nfile = "model.pt2"')
    example = (torch.randn(2, 3, 32, 32),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, example, dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "model.pt2"))
    folder = write_model(
        repo,
        "tiny_vision",
        'source = "torchvision"\narchitecture = "squeezenet1_1"',
        '[weights]\nfile = "weights.pth"\n',
    )
    torch.manual_seed(1)
    vision = torchvision.models.squeezenet1_1(num_classes=3).eval()
    torch.save(vision.state_dict(), folder / "weights.pth")
    return repo, {"tiny_script": net, "tiny_export": net, "tiny_vision": vision}


def reference_scores(module: nn.Module, name: str) -> torch.Tensor:
    pipeline = transforms.Compose(
        [
            transforms.Resize(36, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    image = Image.open(io.BytesIO(photo(name))).convert("RGB")
    with torch.inference_mode():
        return torch.softmax(module(pipeline(image)[None]), dim=1)[0]


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_every_model_kind_in_the_repository_is_served(
    mixed_repository: tuple[Path, dict[str, nn.Module]], runtime: str
) -> None:
    """Every source (TorchScript, torch.export, torchvision, timm) on every runtime, each
    compared with a reference torchvision pipeline and the eval-mode module it was made from."""
    repo, references = mixed_repository
    settings = make_settings(model_repository=repo, runtime=runtime)
    with TestClient(create_app(settings)) as client:
        names = {m["name"] for m in client.get("/v1/models").json()["models"]}
        assert names == {DEFAULT_MODEL, "tiny_script", "tiny_export", "tiny_vision"}
        for name in ["tiny_script", "tiny_export", "tiny_vision"]:
            info = client.get(f"/v1/models/{name}").json()
            assert info["num_classes"] == 3
            assert info["input_size"] == [3, 32, 32]
            assert info["runtime"] == runtime
            if runtime != "torch":
                assert 0 <= info["max_logit_difference"] <= 1e-4
            expected = reference_scores(references[name], "coffee.jpg")
            response = client.post(
                f"/v1/models/{name}/predict?top_k=3", files={"file": photo("coffee.jpg")}
            )
            assert response.status_code == 200, response.text
            served = torch.zeros(3)
            for entry in response.json()["predictions"][0]["classes"]:
                assert entry["label"] == TINY_LABELS[entry["index"]]
                served[entry["index"]] = entry["score"]
            assert torch.allclose(served, expected, atol=1e-5), name
            # A model with 3 classes cannot give 4.
            too_many = client.post(
                f"/v1/models/{name}/predict?top_k=4", files={"file": photo("coffee.jpg")}
            )
            assert too_many.status_code == 422
            assert too_many.json()["error"]["code"] == "invalid_parameter"


def test_program_exported_in_train_mode_is_refused(tmp_path: Path) -> None:
    repo = repository_with_default(tmp_path)
    folder = write_model(repo, "broken", 'source = "export"\nfile = "model.pt2"')
    net = trained_tiny().train()
    program = torch.export.export(net, (torch.randn(2, 3, 32, 32),))
    torch.export.save(program, str(folder / "model.pt2"))
    fails_with(repo, "model 'broken'", "training mode", "model.eval()")


def test_served_torchscript_model_is_in_eval_mode(
    mixed_repository: tuple[Path, dict[str, nn.Module]],
) -> None:
    spec = discover(mixed_repository[0])["tiny_script"]
    classifier = Classifier(spec, torch.device("cpu"), None)
    try:
        assert not any(m.training for m in classifier.module.modules())
        # Eval mode is deterministic (no dropout) and uses running statistics (batch of one works).
        classifier.warm_up(1)
        first = classifier.module(torch.ones(1, 3, 32, 32))
        second = classifier.module(torch.ones(1, 3, 32, 32))
        assert torch.equal(first, second)
    finally:
        classifier.close()


def start_up(repo: Path, default: str = DEFAULT_MODEL) -> None:
    async def scenario() -> None:
        app = create_app(make_settings(model_repository=repo, default_model=default))
        async with LifespanManager(app, startup_timeout=120):
            pass

    asyncio.run(scenario())


def fails_with(repo: Path, *fragments: str, default: str = DEFAULT_MODEL) -> None:
    with pytest.raises(ModelConfigError) as caught:
        start_up(repo, default)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_weights_file_names_the_model_and_the_file(tmp_path: Path) -> None:
    repo = repository_with_default(tmp_path)
    write_model(
        repo,
        "broken",
        'source = "torchvision"\narchitecture = "squeezenet1_1"',
        '[weights]\nfile = "gone.pth"\n',
    )
    fails_with(repo, "model 'broken'", "weights file not found", "gone.pth")


def test_weights_that_do_not_fit_the_architecture_stop_start_up(tmp_path: Path) -> None:
    repo = repository_with_default(tmp_path)
    folder = write_model(
        repo,
        "broken",
        'source = "torchvision"\narchitecture = "squeezenet1_1"',
        '[weights]\nfile = "weights.pth"\n',
    )
    torch.save({"conv.weight": torch.zeros(1)}, folder / "weights.pth")
    fails_with(repo, "model 'broken'", "weights do not fit the architecture")


def test_labels_that_do_not_match_the_output_stop_start_up(tmp_path: Path) -> None:
    repo = repository_with_default(tmp_path)
    folder = write_model(
        repo,
        "broken",
        'source = "torchscript"\nfile = "model.pt"',
        labels=["a", "b", "c", "d"],
    )
    torch.jit.script(trained_tiny()).save(str(folder / "model.pt"))
    fails_with(repo, "model 'broken'", "output has shape", "4 labels")


@pytest.mark.parametrize(
    ("model_section", "extra", "fragment"),
    [
        ('source = "timm"\narchitecture = "no_such_net"', "", "timm has no architecture"),
        ('source = "onnx"\nfile = "m.onnx"', "", "model.source"),
        ('source = "timm"', "", "needs model.architecture"),
        (
            'source = "timm"\narchitecture = "resnet18"',
            '[weights]\npackage = "no_such_package_xyz"\npath = "w.pth"\n',
            "not installed",
        ),
        (
            'source = "timm"\narchitecture = "resnet18"',
            '[weights]\nfile = "model.toml"\n',
            "cannot read weights",
        ),
    ],
)
def test_bad_model_toml_stops_start_up_with_a_clear_message(
    tmp_path: Path, model_section: str, extra: str, fragment: str
) -> None:
    repo = repository_with_default(tmp_path)
    write_model(repo, "broken", model_section, extra)
    fails_with(repo, "model 'broken'", fragment)


def test_an_unknown_key_map_stops_start_up_naming_it_and_the_known_ones(tmp_path: Path) -> None:
    repo = repository_with_default(tmp_path)
    folder = write_model(
        repo,
        "broken",
        'source = "torchvision"\narchitecture = "squeezenet1_1"',
        '[weights]\nfile = "weights.pth"\nkey_map = "mystery"\n',
    )
    # Real weights for this very architecture: the key map is the only thing wrong.
    module = torchvision.models.squeezenet1_1(num_classes=len(TINY_LABELS))
    torch.save(module.state_dict(), folder / "weights.pth")
    fails_with(
        repo,
        "model 'broken'",
        "unknown weights.key_map 'mystery'",
        f"(known: {', '.join(KEY_MAPS)})",
        "efficientnet_pytorch",
    )
    # Without the key map the same files load: nothing else was at fault.
    toml = folder / "model.toml"
    toml.write_text(toml.read_text().replace('key_map = "mystery"\n', ""))
    assert isinstance(build_module(discover(repo)["broken"]), nn.Module)


def test_unknown_default_model_stops_start_up(tmp_path: Path) -> None:
    repo = repository_with_default(tmp_path)
    with pytest.raises(ValueError, match="default model 'absent' is not in the repository"):
        start_up(repo, default="absent")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    repo = repository_with_default(tmp_path)
    (repo / "broken").mkdir()
    (repo / "broken" / "model.toml").write_text("[model\nsource = ")
    fails_with(repo, "model 'broken'", "not valid TOML")
