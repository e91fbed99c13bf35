"""Medical inputs: one-channel models get luminance; 16-bit pictures and DICOM keep their precision up to
normalization, the same over the own API, KServe v1 and the Open Inference Protocol v2; overlays are drawn on the
windowed gray picture; a models file that contradicts the model stops start-up."""

from __future__ import annotations

import base64
import io
import sys

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from camserve.errors import PayloadTooLargeError, UnsupportedMediaError
from camserve.images import ImageLimits, decode_image
from camserve.models import ModelRegistry, ModelSpec, load_model
from camserve.models.errors import ModelConfigError
from camserve.models.loader import build_model
from camserve.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from tests.apphelpers import live_server
from tests.protocolhelpers import binary_request

timm = pytest.importorskip("timm")
pydicom = pytest.importorskip("pydicom")
from pydicom import examples  # noqa: E402  # after the skip: pydicom is an optional extra
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

MODEL = "xray"
CLASSES = 4
#: A one-channel model's statistics: ImageNet's RGB ones averaged.
GRAY_MEAN, GRAY_STD = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
#: The service resizes in PIL's float mode, the references here with torch's antialiased filter: their
#: probabilities agree within 1e-7 here, and to this tolerance anywhere.
SAME = 1e-5


# -- the model, served -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module() -> torch.nn.Module:
    """A seeded random timm resnet18 taking one channel, its logits spread so probabilities tell inputs apart."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=CLASSES).eval()
    with torch.no_grad():
        model.fc.weight.mul_(100.0)
    return model


@pytest.fixture(scope="module")
def weights(module, tmp_path_factory):
    path = tmp_path_factory.mktemp("xray") / "resnet18-gray.pth"
    torch.save(module.state_dict(), path)
    return path


def models_file(folder, weights, extra: str = ""):
    path = folder / "models.toml"
    path.write_text(
        f'[[models]]\nname = "{MODEL}"\nkind = "timm"\narchitecture = "resnet18"\nweights = "{weights}"\n{extra}'
    )
    return path


@pytest.fixture(scope="module")
def live(weights):
    registry = ModelRegistry.load(models_file(weights.parent, weights), "cpu", warmup=False)
    with live_server(registry, max_images_per_request=4) as url:
        yield url


# -- pictures and their independent model inputs ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sixteen_bit() -> np.ndarray:
    """A 16-bit gradient (180 x 260) whose every value lies 0.49 of an 8-bit step above one: 8 bits lose all of it."""
    steps = np.floor(np.linspace(60, 180, 260)[None, :] + np.linspace(0, 40, 180)[:, None])
    return np.rint(257 * (steps + 0.49)).astype(np.uint16)


def png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ct_with_windows():
    """pydicom's CT example (signed 16-bit, rescale intercept -1024) with two VOI windows: a viewer shows the first."""
    dataset = examples.ct
    dataset.WindowCenter = [40, 400]
    dataset.WindowWidth = [400, 2000]
    return dataset


def windowed(dataset) -> np.ndarray:
    """[0, 1] gray by hand: pydicom's modality LUT and first VOI window, scaled by the window's output range
    (PS3.3 C.11.2.1.2: the stored bits' range, rescaled)."""
    values = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset, index=0)
    bits = int(dataset.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dataset.PixelRepresentation else (0, 2**bits - 1)
    slope, intercept = float(dataset.get("RescaleSlope", 1)), float(dataset.get("RescaleIntercept", 0))
    low, high = low * slope + intercept, high * slope + intercept
    return (values - low) / (high - low)


def reference(module: torch.nn.Module, unit: np.ndarray) -> np.ndarray:
    """The model's probabilities for a [0, 1] gray picture: resized whole to 224 x 224 (bicubic, antialiased, as
    timm's resnet18 config says), normalized, run on the module directly."""
    x = torch.from_numpy(np.asarray(unit, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    with torch.no_grad():
        return module((x - GRAY_MEAN) / GRAY_STD).softmax(1)[0].numpy()


# -- asking the service, every way in ------------------------------------------------------------------------------
def predicted(live: str, data: bytes, media: str = "application/octet-stream") -> np.ndarray:
    response = httpx.post(f"{live}/predict", params={"top_k": CLASSES}, content=data, headers={"content-type": media})
    assert response.status_code == 200, response.text
    scores = np.zeros(CLASSES, dtype=np.float32)
    for p in response.json()["results"][0]["predictions"]:
        scores[p["index"]] = p["score"]
    return scores


def every_protocol(live: str, data: bytes, media: str) -> dict[str, np.ndarray]:
    """The probabilities from the raw body, multipart, JSON base64, KServe v1 and OIP v2 (JSON and binary)."""
    b64 = base64.b64encode(data).decode()
    answers = {"raw": predicted(live, data, media)}
    multipart = httpx.post(f"{live}/predict", params={"top_k": CLASSES}, files={"image": ("x", data, media)})
    json_form = httpx.post(f"{live}/predict", json={"images": [b64], "top_k": CLASSES})
    for name, response in (("multipart", multipart), ("json", json_form)):
        assert response.status_code == 200, response.text
        answers[name] = np.zeros(CLASSES, dtype=np.float32)
        for p in response.json()["results"][0]["predictions"]:
            answers[name][p["index"]] = p["score"]
    v1 = httpx.post(f"{live}/v1/models/{MODEL}:predict", json={"instances": [{"image": {"b64": b64}}], "top_k": 4})
    assert v1.status_code == 200, v1.text
    answers["v1"] = np.zeros(CLASSES, dtype=np.float32)
    for p in v1.json()["predictions"][0]["predictions"]:
        answers["v1"][p["index"]] = p["score"]
    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    v2 = httpx.post(f"{live}/v2/models/{MODEL}/infer", json=v2_json)
    assert v2.status_code == 200, v2.text
    answers["v2"] = np.array(v2.json()["outputs"][0]["data"], dtype=np.float32)
    body, headers = binary_request([data])
    v2_binary = httpx.post(f"{live}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert v2_binary.status_code == 200, v2_binary.text
    answers["v2 binary"] = np.array(v2_binary.json()["outputs"][0]["data"], dtype=np.float32)
    return answers


def refusals(live: str, data: bytes, media: str) -> list[tuple[str, int, str]]:
    """(protocol, status, message) of a refused image sent the raw way, in KServe v1 and in OIP v2."""
    b64 = base64.b64encode(data).decode()
    raw = httpx.post(f"{live}/predict", content=data, headers={"content-type": media})
    v1 = httpx.post(f"{live}/v1/models/{MODEL}:predict", json={"instances": [{"image": {"b64": b64}}]})
    v2_json = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    v2 = httpx.post(f"{live}/v2/models/{MODEL}/infer", json=v2_json)
    return [
        ("raw", raw.status_code, raw.json()["detail"]),
        ("v1", v1.status_code, v1.json()["error"]),
        ("v2", v2.status_code, v2.json()["error"]),
    ]


# -- tests ----------------------------------------------------------------------------------------------------------
def test_a_one_channel_timm_model_is_listed_with_one_channel_and_averaged_statistics(live):
    (listed,) = httpx.get(f"{live}/models").json()["models"]
    assert listed["channels"] == 1
    np.testing.assert_allclose(listed["mean"], [GRAY_MEAN]) and np.testing.assert_allclose(listed["std"], [GRAY_STD])


def test_a_16_bit_png_gives_the_probabilities_of_its_16_bit_values_on_every_protocol(live, module, sixteen_bit):
    expected = reference(module, sixteen_bit / 65535.0)
    for protocol, scores in every_protocol(live, png(sixteen_bit), "image/png").items():
        np.testing.assert_allclose(scores, expected, atol=SAME, err_msg=protocol)


def test_a_16_bit_png_differs_from_its_8_bit_picture(live, module, sixteen_bit):
    eight = np.rint(sixteen_bit / 65535.0 * 255.0).astype(np.uint8)
    from_eight = predicted(live, png(eight), "image/png")
    np.testing.assert_allclose(from_eight, reference(module, eight / 255.0), atol=SAME)  # 8 bits are served exactly
    assert np.abs(predicted(live, png(sixteen_bit), "image/png") - from_eight).max() > 50 * SAME


def test_a_16_bit_tiff_gives_what_the_same_png_gives(live, sixteen_bit):
    buffer = io.BytesIO()
    Image.fromarray(sixteen_bit).save(buffer, format="TIFF")
    np.testing.assert_allclose(predicted(live, buffer.getvalue()), predicted(live, png(sixteen_bit)), atol=1e-6)


@pytest.mark.parametrize("example", ["ct with two windows", "overlay"])
def test_a_dicom_gives_the_probabilities_of_its_first_window_on_every_protocol(live, module, example):
    """The CT example with rescale and two windows, and the MR example whose first of two windows is not the widest:
    what the service computes equals pydicom's modality LUT and first VOI window, by hand."""
    dataset = ct_with_windows() if example.startswith("ct") else examples.overlay
    expected = reference(module, windowed(dataset))
    for protocol, scores in every_protocol(live, dicom_bytes(dataset), "application/dicom").items():
        np.testing.assert_allclose(scores, expected, atol=SAME, err_msg=protocol)
    second = ct_with_windows() if example.startswith("ct") else examples.overlay
    second.WindowCenter, second.WindowWidth = dataset.WindowCenter[1], dataset.WindowWidth[1]
    assert np.abs(predicted(live, dicom_bytes(second)) - expected).max() > 100 * SAME  # the window matters


def test_a_dicom_without_a_window_is_stretched_from_its_smallest_to_its_largest_value():
    dataset = examples.ct  # no window: viewers show the values' own range
    values = apply_modality_lut(dataset.pixel_array, dataset)
    decoded = decode_image(dicom_bytes(dataset), channels=1)
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(decoded.pixels[0].numpy(), expected, atol=1e-6)
    assert decoded.pixels.dtype == torch.float32 and decoded.format == "DICOM"


def test_a_voi_lut_is_preferred_to_the_window_and_scaled_by_its_bits_per_entry():
    """A VOI LUT Sequence (12 bits per entry) beside a window: pydicom applies the LUT, whose range is 0..4095."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    dataset = ct_with_windows()
    lut = Dataset()
    lut.add_new("LUTDescriptor", "SS", [2000, -1000, 12])  # 2000 entries from -1000 HU, 12 bits each
    lut.add_new("LUTData", "US", list(range(0, 4000, 2)))
    dataset.VOILUTSequence = Sequence([lut])
    values = apply_modality_lut(dataset.pixel_array, dataset).astype(np.int32)  # a LUT is indexed by integers
    expected = np.clip(values + 1000, 0, 1999) * 2 / 4095
    np.testing.assert_allclose(decode_image(dicom_bytes(dataset), channels=1).pixels[0].numpy(), expected, atol=1e-6)


def test_monochrome1_is_inverted():
    dataset = ct_with_windows()
    gray = decode_image(dicom_bytes(dataset), channels=1).pixels
    dataset.PhotometricInterpretation = "MONOCHROME1"
    inverted = decode_image(dicom_bytes(dataset), channels=1).pixels
    np.testing.assert_allclose(inverted.numpy(), 1.0 - gray.numpy(), atol=1e-6)


def test_a_three_channel_model_gets_a_dicom_as_its_8_bit_windowed_gray_in_every_channel():
    dataset = ct_with_windows()
    pixels = decode_image(dicom_bytes(dataset), channels=3).pixels
    expected = np.rint(np.clip(windowed(dataset), 0, 1) * 255).astype(np.uint8)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 128, 128)
    for channel in pixels.numpy():
        np.testing.assert_array_equal(channel, expected)


def test_a_one_channel_model_gets_an_rgb_picture_as_pils_luminance(live, module, chelsea):
    """An 8-bit RGB photo on a one-channel model: PIL's "L" of it, then the model."""
    luminance = np.asarray(Image.fromarray(chelsea).convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(chelsea).save(buffer, format="PNG")
    np.testing.assert_allclose(predicted(live, buffer.getvalue()), reference(module, luminance / 255.0), atol=SAME)
    decoded = decode_image(buffer.getvalue(), channels=1)
    assert decoded.pixels.dtype == torch.uint8 and np.array_equal(decoded.pixels[0].numpy(), luminance)


def test_a_multi_frame_dicom_is_a_415_naming_its_frames_on_every_protocol(live):
    data = dicom_bytes(examples.rt_dose)  # 15 frames
    for protocol, status, message in refusals(live, data, "application/dicom"):
        assert status == 415 and "multi-frame (15 frames)" in message, (protocol, message)


def test_compressed_pixel_data_without_its_decoder_is_a_415_naming_the_compression(live):
    from pydicom import uid
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if get_decoder(uid.JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    dataset = examples.ct
    dataset.file_meta.TransferSyntaxUID = uid.JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS \xff\xd9"])
    dataset["PixelData"].VR = "OB"
    for protocol, status, message in refusals(live, dicom_bytes(dataset), "application/octet-stream"):
        assert status == 415, (protocol, message)
        assert "compressed as JPEG-LS Lossless Image Compression" in message and "pylibjpeg" in message, message


def test_a_file_pydicom_cannot_parse_and_truncated_pixels_are_400s(live):
    """Unreadable data is a 400, as for any image: a "deflated" body that is not, pixel data cut short."""
    from pydicom import uid
    from pydicom.filewriter import write_file_meta_info

    meta = examples.ct.file_meta
    meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO(b"\x00" * 128 + b"DICM")
    buffer.seek(0, io.SEEK_END)
    write_file_meta_info(buffer, meta, enforce_standard=True)
    buffer.write(b"not deflated at all" * 5)
    for protocol, status, message in refusals(live, buffer.getvalue(), "application/dicom"):
        assert status == 400 and "the DICOM file cannot be parsed (error: " in message, (protocol, message)
    cut = dicom_bytes(examples.ct)[:30000]
    for protocol, status, message in refusals(live, cut, "application/dicom"):
        assert status == 400 and "the DICOM pixel data cannot be decoded" in message, (protocol, message)


def test_without_pydicom_a_dicom_is_a_415_naming_the_extra(live, monkeypatch):
    data = dicom_bytes(examples.ct)
    for name in ("pydicom", "pydicom.pixels"):
        monkeypatch.setitem(sys.modules, name, None)
    for protocol, status, message in refusals(live, data, "application/dicom"):
        assert status == 415 and "pip install 'camserve[dicom]'" in message, (protocol, message)


def test_the_pixel_limit_refuses_a_dicom_before_its_pixels_are_decoded(monkeypatch):
    data = dicom_bytes(examples.ct)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda _: pytest.fail("pixels were decoded")))
    with pytest.raises(PayloadTooLargeError, match=r"128x128 = 0.0 megapixels, above the limit"):
        decode_image(data, ImageLimits(max_pixels=128 * 127))
    with pytest.raises(PayloadTooLargeError, match="bytes, above the limit"):
        decode_image(data, ImageLimits(max_bytes=1000))
    with pytest.raises(UnsupportedMediaError, match="multi-frame"):
        decode_image(dicom_bytes(examples.rt_dose))


def test_overlays_of_a_dicom_are_drawn_on_its_windowed_gray_picture(live):
    """alpha 0 leaves the picture itself: the 8-bit windowed gray in R, G and B at the input's size; the default
    alpha blends a map over it."""
    dataset = ct_with_windows()
    data = dicom_bytes(dataset)
    gray = np.rint(np.clip(windowed(dataset), 0, 1) * 255).astype(np.uint8)
    for alpha, check in ((0, "equal"), (0.5, "blended")):
        params = {"overlay": "true", "alpha": str(alpha), "method": "gradcam"}
        response = httpx.post(
            f"{live}/explain", params=params, content=data, headers={"content-type": "application/dicom"}
        )
        assert response.status_code == 200, response.text
        (explanation,) = response.json()["results"][0]["explanations"]
        overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]))))
        assert overlay.shape == (128, 128, 3)
        if check == "equal":
            for channel in range(3):
                np.testing.assert_array_equal(overlay[:, :, channel], gray)
        else:
            assert overlay.std() > 10 and not np.array_equal(overlay[:, :, 0], overlay[:, :, 2])
    body = {"instances": [{"image": {"b64": base64.b64encode(data).decode()}}], "overlay": True, "alpha": 0}
    v1 = httpx.post(f"{live}/v1/models/{MODEL}:explain", json=body)
    assert v1.status_code == 200, v1.text
    (explanation,) = v1.json()["explanations"][0]["explanations"]
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]))))
    np.testing.assert_array_equal(overlay[:, :, 1], gray)


# -- start-up -------------------------------------------------------------------------------------------------------
def test_a_models_file_contradicting_the_models_channels_stops_start_up_naming_the_model(weights, tmp_path):
    for extra, words in (
        (
            "channels = 3",
            "model 'xray': channels = 3 contradicts the model (the weights of its first convolution conv1: 1)",
        ),
        ("mean = [0.5, 0.5, 0.5]", "model 'xray': `mean` has 3 values but the model takes 1 input channel(s); give 1"),
    ):
        with pytest.raises(ModelConfigError) as error:
            ModelRegistry.load(models_file(tmp_path, weights, extra), "cpu", warmup=False)
        assert words in str(error.value)
    with pytest.raises(ModelConfigError, match="model 'xray' field channels: Input should be 1 or 3"):
        ModelRegistry.load(models_file(tmp_path, weights, "channels = 2"), "cpu", warmup=False)
    with pytest.raises(ModelConfigError, match=r"mean and std need 1 value\(s\) for channels = 1"):
        ModelRegistry.load(models_file(tmp_path, weights, "channels = 1\nstd = [0.2, 0.2, 0.2]"), "cpu", warmup=False)


def test_an_entrypoint_model_takes_the_channels_the_models_file_gives():
    gray = ModelSpec(name="gray", kind="entrypoint", entrypoint="torchvision.models:resnet18", channels=1)
    with pytest.raises(
        ModelConfigError, match="model 'gray': a forward pass on a 1-channel 224x224 input failed.*set `channels`"
    ):
        load_model(gray, torch.device("cpu"), warmup=False)
    served = load_model(gray.model_copy(update={"channels": 3}), torch.device("cpu"), warmup=False)
    assert served.channels == 3 and served.mean == IMAGENET_MEAN


def test_a_torchvision_model_whose_weights_take_one_channel_gets_a_one_channel_first_convolution(tmp_path):
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(model.eval().state_dict(), tmp_path / "gray.pth")
    built = build_model(
        ModelSpec(name="tv", kind="torchvision", architecture="resnet18", weights=tmp_path / "gray.pth")
    )
    assert built.preprocessing.channels == 1 and built.preprocessing.mean == (GRAY_MEAN,)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(built.module.eval()(x), model(x))


def test_a_hugging_face_model_with_one_channel_in_its_config_takes_one_channel(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_channels=1, num_labels=CLASSES,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    spec = ModelSpec(name="hf-gray", kind="huggingface", path=tmp_path)
    served = load_model(spec, torch.device("cpu"), warmup=False)
    assert served.channels == 1 and served.input_size == (32, 32) and len(served.mean) == 1
    with pytest.raises(ModelConfigError, match="channels = 3 contradicts the model \\(its config's num_channels: 1\\)"):
        build_model(spec.model_copy(update={"channels": 3}))
