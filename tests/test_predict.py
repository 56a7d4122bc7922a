"""Predict: images made MNIST-like, .npy arrays read exactly, bad inputs named, classify."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mnist_mlp import runtime
from mnist_mlp.config import MlpConfig, TrainConfig
from mnist_mlp.data import preprocess
from mnist_mlp.errors import CheckpointError
from mnist_mlp.evaluate import EVAL_BATCH_SIZE
from mnist_mlp.predict import InputError, Sample, classify, load_inputs, mnist_style, predict


def _rectangle(height: int, width: int, shape=(200, 300), at=(20, 200)) -> np.ndarray:
    """White ink (255) on black, a filled rectangle well off the canvas's centre."""
    image = np.zeros(shape, dtype=np.uint8)
    image[at[0] : at[0] + height, at[1] : at[1] + width] = 255
    return image


def _ink_box(image: np.ndarray, level: float = 0.0) -> tuple[int, int]:
    """(height, width) of the pixels brighter than `level`."""
    rows = np.nonzero((image > level).any(axis=1))[0]
    cols = np.nonzero((image > level).any(axis=0))[0]
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def _centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(image.shape)
    mass = image.sum()
    return (rows * image).sum() / mass, (cols * image).sum() / mass


def _save(array: np.ndarray, path, **options):
    Image.fromarray(array).save(path, **options)
    return path


# ------------------------------------------------------------ mnist_style


@pytest.mark.parametrize(
    ("height", "width", "box"),
    [
        (100, 50, (20, 10)),  # 2:1 stays 2:1
        (40, 100, (8, 20)),  # wide: the longer side is the one fitted to 20
        (10, 5, (20, 10)),  # smaller than 20: enlarged, as MNIST's small digits were
        (3, 3, (20, 20)),
    ],
)
def test_the_digit_is_fitted_into_20x20_keeping_its_aspect_and_centred(height, width, box):
    out = mnist_style(_rectangle(height, width))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    # A filled rectangle resizes to a filled rectangle: the box is exact at any level.
    assert _ink_box(out) == box
    assert _ink_box(out, 0.5) == box
    # An integer shift brings the centre of mass to within half a pixel of (14, 14).
    row, col = _centre_of_mass(out)
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5


def test_both_polarities_and_any_paper_grey_give_the_same_digit():
    light_on_dark = _rectangle(100, 50)
    dark_on_light = 255 - light_on_dark
    pencil_on_grey = np.where(light_on_dark > 0, 60, 150).astype(np.uint8)
    expected = mnist_style(light_on_dark)
    np.testing.assert_array_equal(mnist_style(dark_on_light), expected)
    # Mid-grey paper (150) is below half scale, yet the ink is the darker side.
    np.testing.assert_array_equal(mnist_style(pencil_on_grey), expected)
    # Floats in [0, 1] are read as uint8 / 255.
    np.testing.assert_array_equal(mnist_style(dark_on_light / 255.0), expected)


def test_faint_noise_neither_widens_the_box_nor_shows_in_the_background():
    clean = _rectangle(100, 50) / 255.0
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0.0, 0.03, clean.shape), 0.0, 1.0)
    noisy[190:193, 5:8] = 0.1  # a faint smudge far from the digit
    out = mnist_style(noisy)
    assert _ink_box(out) == (20, 10)
    assert (out > 0).sum() == 200  # exactly the 20x10 box; every other pixel is 0
    row, col = _centre_of_mass(out)
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5


def test_lopsided_digit_is_shifted_only_as_far_as_no_ink_is_cut_off():
    # A T: a heavy bar on a thin stem. Its centre of mass is near the top, so
    # centring it exactly would push the stem's foot off the bottom edge.
    image = np.zeros((200, 300), dtype=np.uint8)
    image[10:40, 50:250] = 255
    image[40:190, 145:155] = 255
    out = mnist_style(image)
    assert _ink_box(out) == (18, 20)  # 180x200 fitted to 20 wide: all 18 rows are there
    assert out[-1].max() > 0  # pushed down to the bottom edge and no further
    row, _ = _centre_of_mass(out)
    assert 12.5 < row < 13.5  # as close to 14 as the field allows


def test_real_mnist_digits_come_back_nearly_unchanged(t10k):
    # MNIST digits are already fitted and centred: the pipeline must be (close
    # to) the identity on them. Measured: mean absolute difference 0.0035.
    images = t10k[0][:200]
    diffs = [np.abs(mnist_style(image) - image / 255.0).mean() for image in images]
    assert np.mean(diffs) < 0.01
    unchanged = sum(_ink_box(mnist_style(i), 0.5) == _ink_box(i / 255.0, 0.5) for i in images)
    assert unchanged >= 195  # measured: all 200


def test_a_blank_image_has_no_digit():
    with pytest.raises(InputError, match=r"^scan\.png: no digit found"):
        mnist_style(np.full((50, 40), 200, dtype=np.uint8), name="scan.png")
    # JPEG-like noise on blank paper is not a digit either.
    noise = np.random.default_rng(1).integers(245, 256, size=(50, 40)).astype(np.uint8)
    with pytest.raises(InputError, match="no digit found"):
        mnist_style(noise)


def test_mnist_style_refuses_what_is_not_a_2d_grayscale_array():
    with pytest.raises(ValueError, match=r"shape \(28, 28, 3\)"):
        mnist_style(np.zeros((28, 28, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="dtype int64"):
        mnist_style(np.zeros((28, 28), dtype=np.int64))


# ------------------------------------------------------------- image files


def test_an_image_file_becomes_one_sample(tmp_path):
    drawing = 255 - _rectangle(100, 50)
    path = _save(drawing, tmp_path / "digit.png")
    (sample,) = load_inputs(path)
    assert sample.input == str(path) and sample.index is None and sample.name == str(path)
    assert sample.pixels.shape == (784,) and sample.pixels.dtype == np.float32
    np.testing.assert_array_equal(sample.pixels, mnist_style(drawing).reshape(784))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_transparent_background_is_paper(tmp_path, mode):
    ink = _rectangle(100, 50) > 0
    # Transparent pixels that are black underneath: dropping the alpha channel
    # would give an all-black, blank image.
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(ink, 255, 0)
    path = tmp_path / "drawn.png"
    Image.fromarray(rgba).convert(mode).save(path)
    (sample,) = load_inputs(path)
    np.testing.assert_array_equal(sample.pixels, mnist_style(_rectangle(100, 50)).reshape(784))


def test_the_kind_of_file_is_read_from_its_content_not_its_name(tmp_path):
    drawing = 255 - _rectangle(100, 50)
    (as_dat,) = load_inputs(_save(drawing, tmp_path / "digit.dat", format="PNG"))
    np.testing.assert_array_equal(as_dat.pixels, mnist_style(drawing).reshape(784))
    np.save(tmp_path / "array.npy", np.zeros((28, 28), dtype=np.uint8))
    (tmp_path / "array.npy").rename(tmp_path / "array.png")
    (as_png,) = load_inputs(tmp_path / "array.png")
    assert as_png.index is None and not as_png.pixels.any()


def test_a_16_bit_png_reads_like_its_8_bit_original(tmp_path):
    drawing = 255 - _rectangle(100, 50)
    path = _save((drawing.astype(np.uint16) * 257), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    (sample,) = load_inputs(path)
    np.testing.assert_array_equal(sample.pixels, mnist_style(drawing).reshape(784))


def test_a_photo_stored_sideways_is_turned_upright_by_its_exif_orientation(tmp_path):
    tall = 255 - _rectangle(100, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(tall).save(path, exif=exif, quality=95)
    (sample,) = load_inputs(path)
    assert _ink_box(sample.pixels.reshape(28, 28), 0.5) == (10, 20)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "missing.png", "missing.png: file not found"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "photo.txt", b"not a picture\n"), "photo.txt: not an image or .npy"),
        (lambda d: _write(d / "arr.npy", b"garbage"), "arr.npy: not a valid .npy array"),
        (lambda d: _truncated(d / "cut.png", "PNG"), "cut.png: cannot decode the image"),
        (lambda d: _truncated(d / "cut.jpg", "JPEG"), "cut.jpg: cannot decode the image"),
        (lambda d: _truncated_npy(d / "cut.npy"), "cut.npy: "),
        (lambda d: _npz(d / "many.npz"), "many.npz: an .npz archive"),
        (lambda d: _save(np.full((30, 30), 255, np.uint8), d / "blank.png"), "blank.png: no digit"),
    ],
    ids=[
        "missing",
        "directory",
        "text",
        "bad-npy",
        "png-cut",
        "jpeg-cut",
        "npy-cut",
        "npz",
        "blank",
    ],
)
def test_unreadable_inputs_are_one_line_errors_naming_the_file(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        load_inputs(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and fragment in message
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_a_text_file_is_told_what_predict_reads(tmp_path):
    path = _write(tmp_path / "photo.txt", b"hello")
    with pytest.raises(InputError) as caught:
        load_inputs(path)
    assert str(caught.value) == (
        f"{path}: not an image or .npy array; predict reads images (PNG, JPEG, ...; any size, "
        "either polarity) and .npy arrays of shape (28, 28), (N, 28, 28) or (N, 784)"
    )


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated(path, fmt: str):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _truncated_npy(path):
    np.save(path, np.zeros((5, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _npz(path):
    np.savez(path, x=np.zeros((2, 28, 28), dtype=np.uint8))
    return path


# ------------------------------------------------------------------- arrays


def test_arrays_of_each_accepted_shape_and_dtype(tmp_path):
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    cases = {
        "one.npy": (digits[0], [None]),
        "stack.npy": (digits, [0, 1, 2]),
        "flat64.npy": (digits.reshape(3, 784).astype(np.int64), [0, 1, 2]),
        "scaled.npy": (digits.reshape(3, 784) / 255.0, [0, 1, 2]),
        "half.npy": ((digits / 255.0).astype(np.float16), [0, 1, 2]),
    }
    for name, (array, indices) in cases.items():
        np.save(tmp_path / name, array)
        samples = load_inputs(tmp_path / name)
        assert [s.index for s in samples] == indices, name
        assert all(s.input == str(tmp_path / name) for s in samples)
        pixels = np.stack([s.pixels for s in samples])
        assert pixels.dtype == np.float32 and pixels.shape == (len(indices), 784)
        if array.dtype.kind == "f":
            # Floats are used as they are: not re-centred, not rescaled.
            np.testing.assert_array_equal(pixels, array.reshape(len(indices), 784).astype("f4"))
        else:
            expected = digits[: len(indices)].reshape(-1, 784).astype(np.float32) / 255.0
            np.testing.assert_array_equal(pixels, expected)
    assert load_inputs(tmp_path / "stack.npy")[2].name == f"{tmp_path / 'stack.npy'}[2]"


def _object_npy(path):
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize(
    ("array", "fragments"),
    [
        (np.zeros((28, 27), np.uint8), ["shape (28, 27)", "(N, 784)"]),
        (np.zeros((2, 28, 28, 1), np.uint8), ["shape (2, 28, 28, 1)"]),
        (np.zeros((784,), np.uint8), ["shape (784,)"]),
        (np.zeros((0, 28, 28), np.uint8), ["shape (0, 28, 28)", "no digits"]),
        (np.zeros((0, 784), np.float32), ["shape (0, 784)", "no digits"]),
        (np.zeros((28, 28), bool), ["dtype bool"]),
        (np.zeros((28, 28), np.complex64), ["dtype complex64"]),
        (np.full((28, 28), "a"), ["dtype <U1"]),
        (np.full((2, 784), 256, np.int32), ["int32", "values 256..256", "0..255"]),
        (np.full((28, 28), -1, np.int8), ["int8", "values -1..-1"]),
        (np.full((2, 784), 255.0), ["float64", "values 255..255", "[0, 1]"]),
        (np.full((28, 28), -0.5, np.float32), ["float32", "values -0.5..-0.5"]),
        (np.full((28, 28), np.nan, np.float32), ["float32", "NaN or infinite"]),
        (np.full((1, 28, 28), np.inf), ["float64", "NaN or infinite"]),
    ],
    ids=lambda v: getattr(v, "dtype", None) and f"{v.dtype}{v.shape}",
)
def test_arrays_that_are_not_digits_are_refused_naming_what_was_found(tmp_path, array, fragments):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(InputError) as caught:
        load_inputs(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_an_array_of_python_objects_is_refused_without_unpickling(tmp_path):
    path = _object_npy(tmp_path / "objects.npy")
    with pytest.raises(InputError, match=r"objects\.npy: not a numeric \.npy array"):
        load_inputs(path)


# ------------------------------------------------------------ the model part


@pytest.fixture(scope="module")
def keras():
    runtime.import_tensorflow()
    import keras

    return keras


@pytest.fixture(scope="module")
def untrained(keras, tmp_path_factory):
    """A tiny model with random weights, saved: enough to check the plumbing."""
    from mnist_mlp.model import build_model

    keras.utils.set_random_seed(3)
    model = build_model(MlpConfig(units=16))
    path = tmp_path_factory.mktemp("untrained") / "model.keras"
    model.save(path)
    return model, path


@pytest.fixture(scope="module")
def trained(keras, t10k, tmp_path_factory):
    """A small MLP trained on t10k images 1,000..9,999 (about 90% accurate), saved."""
    from mnist_mlp.model import build_model, compile_model

    x, y = t10k
    keras.utils.set_random_seed(0)
    model = build_model(MlpConfig(units=128))
    compile_model(model, TrainConfig())
    features, targets = preprocess(x[1000:], y[1000:])
    model.fit(features, targets, epochs=3, batch_size=128, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "model.keras"
    model.save(path)
    return model, path


def test_predict_gives_the_argmax_and_the_top_three_most_probable_first(untrained):
    model, _ = untrained
    rng = np.random.default_rng(0)
    pixels = rng.random((5, 784), dtype=np.float32)
    samples = [Sample(input="rows.npy", index=i, pixels=p) for i, p in enumerate(pixels)]
    expected = model.predict(pixels, batch_size=EVAL_BATCH_SIZE, verbose=0)
    results = predict(model, samples)
    assert [r.index for r in results] == list(range(5))
    for result, probabilities in zip(results, expected, strict=True):
        assert result.digit == int(probabilities.argmax())
        assert [d for d, _ in result.top] == list(np.argsort(-probabilities)[:3])
        assert [p for _, p in result.top] == sorted((p for _, p in result.top), reverse=True)
        assert result.probabilities == tuple(float(p) for p in probabilities)
        assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert len(predict(model, samples, top=1)[0].top) == 1
    assert predict(model, []) == []
    with pytest.raises(ValueError, match="top=11"):
        predict(model, samples, top=11)


def test_classify_keeps_the_input_order_and_collects_bad_inputs(untrained, tmp_path):
    model, checkpoint = untrained
    digit = _save(255 - _rectangle(100, 50), tmp_path / "digit.png")
    rows = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "rows.npy", rows)
    inputs = [
        tmp_path / "missing.png",
        digit,
        _write(tmp_path / "notes.txt", b"7"),
        tmp_path / "rows.npy",
        _save(_rectangle(40, 100), tmp_path / "wide.jpg"),
    ]
    predictions, errors = classify(checkpoint, [str(p) for p in inputs], device="cpu")
    assert [p.name for p in predictions] == [
        str(digit),
        *(f"{tmp_path / 'rows.npy'}[{i}]" for i in range(3)),
        str(tmp_path / "wide.jpg"),
    ]
    assert [path for path, _ in errors] == [str(inputs[0]), str(inputs[2])]
    assert errors[0][1].startswith(f"{inputs[0]}: file not found")
    assert errors[1][1].startswith(f"{inputs[2]}: not an image or .npy array")
    # The reloaded checkpoint predicts what the model it was saved from predicts.
    good = [inputs[1], inputs[3], inputs[4]]
    pixels = np.stack([s.pixels for path in good for s in load_inputs(path)])
    expected = model.predict(pixels, batch_size=EVAL_BATCH_SIZE, verbose=0)
    np.testing.assert_array_equal([p.probabilities for p in predictions], expected)


def test_classify_as_json(untrained, tmp_path):
    _, checkpoint = untrained
    np.save(tmp_path / "one.npy", np.zeros((28, 28), dtype=np.uint8))
    result = classify(checkpoint, [tmp_path / "one.npy", tmp_path / "gone.npy"], device="cpu")
    document = json.loads(json.dumps(result.as_dict()))
    (only,) = document["predictions"]
    assert only["input"] == str(tmp_path / "one.npy") and only["index"] is None
    assert only["digit"] == only["top"][0]["digit"] and len(only["top"]) == 3
    assert len(only["probabilities"]) == 10
    assert document["errors"] == [
        {"input": str(tmp_path / "gone.npy"), "message": result.errors[0][1]}
    ]


def test_a_bad_checkpoint_stops_classify(tmp_path, keras):
    np.save(tmp_path / "one.npy", np.zeros((28, 28), dtype=np.uint8))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        classify(tmp_path / "nope.keras", [tmp_path / "one.npy"], device="cpu")


def test_arrays_predict_exactly_as_the_training_pipeline_sees_them(trained, t10k, tmp_path):
    model, _ = trained
    x, y = t10k[0][:300], t10k[1][:300]
    features, _ = preprocess(x, y)
    expected = model.predict(features, batch_size=EVAL_BATCH_SIZE, verbose=0)
    np.save(tmp_path / "raw.npy", x)
    np.save(tmp_path / "scaled.npy", features)
    for name in ("raw.npy", "scaled.npy"):
        results = predict(model, load_inputs(tmp_path / name))
        np.testing.assert_array_equal([r.probabilities for r in results], expected)
        assert [r.digit for r in results] == list(expected.argmax(axis=1))


def test_images_of_real_digits_predict_as_the_arrays_do(trained, t10k, tmp_path):
    model, checkpoint = trained
    x = t10k[0][:200]
    paths = [_render(image, i, tmp_path) for i, image in enumerate(x)]
    predictions, errors = classify(checkpoint, paths, device="cpu")
    assert errors == [] and [p.input for p in predictions] == [str(p) for p in paths]
    from_arrays = model.predict(x.reshape(200, 784) / 255.0, verbose=0).argmax(axis=1)
    agreement = np.mean([p.digit for p in predictions] == from_arrays)
    # Measured: 0.970 (seeds 1 and 2: 0.975, 0.970). By rendering: 28x28 PNG 1.00,
    # 112x112 dark-on-light PNG 0.96, JPEG on a 90x140 canvas 1.00, the same
    # inverted as a colour JPEG 0.92. Most misses are digits the whole-pixel
    # centring puts one pixel away from where MNIST has them; a 90%-accurate MLP
    # is not shift-invariant.
    assert agreement >= 0.95


def _render(image: np.ndarray, i: int, folder):
    """Write MNIST test image `i` the way a user might have it, four ways in turn."""
    kind = i % 4
    if kind == 0:  # the 28x28 original
        return _save(image, folder / f"{i}.png")
    if kind == 1:  # enlarged, dark ink on white
        big = np.asarray(Image.fromarray(image).resize((112, 112), Image.Resampling.BICUBIC))
        return _save(255 - big, folder / f"{i}-big.png")
    big = Image.fromarray(image).resize((77, 77), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (90, 140), 0)
    canvas.paste(big, (i % 13, 10 + i % 50))  # somewhere, not centred
    if kind == 2:  # white on black, a JPEG
        canvas.save(folder / f"{i}.jpg", quality=90)
        return folder / f"{i}.jpg"
    paper = Image.fromarray(255 - np.asarray(canvas)).convert("RGB")  # a colour JPEG
    paper.save(folder / f"{i}-paper.jpeg", quality=85)
    return folder / f"{i}-paper.jpeg"


def test_importing_predict_loads_neither_tensorflow_nor_pillow():
    code = (
        "import sys, mnist_mlp.predict; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'PIL') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
