"""kind = "exported": `torch.export` programs (.pt2) get every method, equal to their source module's maps."""

from __future__ import annotations

import pytest
import torch
import torchvision

from camserve.cam.engine import CamEngine
from camserve.cam.methods import METHOD_NAMES
from camserve.cam.rise import RISE
from camserve.models import ModelSpec, load_model
from camserve.models.errors import ModelConfigError

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=6).eval()
    example = torch.randn(2, 3, SIZE, SIZE)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("pt2") / "resnet18.pt2"
    torch.export.save(program, str(path))
    served = load_model(ModelSpec(name="pt2", kind="exported", weights=path), torch.device("cpu"), warmup=False)
    return module, served


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_on_a_pt2_program_equals_the_source_modules_maps(exported, method):
    module, served = exported
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    cam = RISE(masks=64) if method == "rise" else method
    layers = None if method == "rise" else "layer4"
    got = served.engine.explain(x, [[1, 4], [2]], method=cam, layers=layers)
    want = CamEngine(module).explain(x, [[1, 4], [2]], method=cam, layers=layers)
    assert got.pairs == want.pairs and want.maps.abs().amax() > 0
    torch.testing.assert_close(got.maps, want.maps, atol=1e-4 * float(want.maps.abs().amax()), rtol=1e-4)


def test_a_pt2_program_is_served_with_its_input_size_layers_and_own_graph_for_the_split(exported):
    module, served = exported
    assert served.input_size == (SIZE, SIZE) and served.default_layer == "layer4"
    split = served.engine.split(torch.zeros(1, 3, SIZE, SIZE))  # the program's graph, not a second export
    x = torch.randn(3, 3, SIZE, SIZE)
    activation, *carried = split.prefix(x)
    torch.testing.assert_close(split.suffix(activation, *carried), module(x).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(served.engine.predict(x), module(x).detach(), atol=1e-5, rtol=1e-5)


def test_a_file_that_is_no_program_stops_start_up_naming_the_model(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(b"no zip")
    with pytest.raises(ModelConfigError, match="model 'junk': .*junk.pt2 is not a torch.export program"):
        load_model(ModelSpec(name="junk", kind="exported", weights=tmp_path / "junk.pt2"), torch.device("cpu"))
