"""Calibration from a folder of images, read with a preprocessing spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, hwc, shared_model
from hwcompress.data import datasets
from hwcompress.data.calibration import load_calibration
from hwcompress.errors import HwcError
from hwcompress.data.images import parse_preprocessing
from hwcompress.model.loading import load_model

SAMPLES = SHARED / "data" / "imagenet_samples_224" / "imagenet_samples_224_every4th_class.npz"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    with np.load(SAMPLES) as data:
        for i, rgb in enumerate(data["x"][:6]):
            Image.fromarray(rgb).save(folder / f"img{i:02d}.png")
    return folder


@pytest.mark.parametrize("model_name, preset", [("squeezenet1.1-caffe2", "caffe"), ("mobilenetv2-fp32", "torch")])
def test_folder_gives_the_models_documented_preprocessing(image_folder, model_name, preset):
    model = load_model(shared_model(model_name))
    calibration = load_calibration(image_folder, model, preprocess=f"{preset},resize=224")
    expected, _ = datasets.imagenet_samples(SAMPLES, preset)
    got = np.concatenate([next(iter(f.values())) for f in calibration.feeds])
    assert got.shape == (6, 3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[:6], rtol=0, atol=1e-4)
    assert "6 images" in calibration.source and preset in calibration.source


def test_resize_and_centre_crop(tmp_path):
    Image.fromarray(np.full((300, 400, 3), 255, np.uint8)).save(tmp_path / "wide.jpg")
    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[:, :50] = 255  # a white band on the left, cut away by the centre crop
    Image.fromarray(rgb).save(tmp_path / "band.png")
    spec = parse_preprocessing("resize=256,crop=224,scale=255,order=bgr,layout=nhwc")
    from hwcompress.data.images import load_image_folder

    batch = load_image_folder(tmp_path, spec, "x", [1, 224, 224, 3], 8)
    assert batch.shape == (2, 224, 224, 3)
    band, wide = batch  # sorted by file name
    assert np.allclose(wide, 1.0) and band.max() == 0.0  # 400x300 -> 341x256 (band x<43), crop from x=58


def test_bad_folders_and_specs_are_one_line_errors(tmp_path, image_folder):
    model = load_model(shared_model("squeezenet1.1-caffe2"))
    with pytest.raises(HwcError, match="--preprocess"):
        load_calibration(image_folder, model)
    with pytest.raises(HwcError, match="crops to 200x200 but input 'data_0' takes 224x224"):
        load_calibration(image_folder, model, preprocess="caffe,crop=200")
    with pytest.raises(HwcError, match="unknown preset 'tf'"):
        parse_preprocessing("tf")
    with pytest.raises(HwcError, match="mean has 2 values for 3 channel"):
        load_calibration(image_folder, model, preprocess="torch,mean=1:2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HwcError, match="no images"):
        load_calibration(tmp_path / "empty", model, preprocess="caffe")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(HwcError, match="x.png is not a readable image"):
        load_calibration(tmp_path / "bad", model, preprocess="caffe")


def test_quantize_cli_calibrates_on_an_image_folder(tmp_path):
    x, _ = datasets.mnist(SHARED / "data" / "mnist_t10k", count=16)
    (tmp_path / "digits").mkdir()
    for i, digit in enumerate(x):
        Image.fromarray((digit[0] * 255).round().astype(np.uint8)).save(tmp_path / "digits" / f"{i:02d}.png")
    out = tmp_path / "q.onnx"
    result = hwc("quantize", str(shared_model("mnist-8")), "-o", str(out), "--calib", str(tmp_path / "digits"),
                 "--preprocess", "mnist", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "16 images, preprocessing mnist" in json.dumps(report) and out.exists()
    missing = hwc("quantize", str(shared_model("mnist-8")), "-o", str(tmp_path / "n.onnx"), "--calib",
                  str(tmp_path / "digits"))
    errors = [line for line in missing.stderr.splitlines() if line.startswith("hwc: error:")]
    assert missing.returncode == 2 and len(errors) == 1 and "--preprocess" in errors[0]
    assert "Traceback" not in missing.stderr and not (tmp_path / "n.onnx").exists()
