"""GenieBlueImageProcessor and GenieBlueProcessor: tiling, placeholder expansion, chat templates, bad input."""

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoProcessor

from genieblue_hf import GenieBlueImageProcessor, GenieBlueProcessor

from genieblue_hf.testing import (
    IMAGE_SIZE, TOKENS_PER_TILE, bpe_tokenizer, colour_image, model_for, sentencepiece_tokenizer,
)


def image_processor(max_tiles=4, **kwargs):
    return GenieBlueImageProcessor(image_size=IMAGE_SIZE, image_tokens_per_tile=TOKENS_PER_TILE, max_tiles=max_tiles,
                                   **kwargs)


@pytest.fixture(params=["bpe", "sentencepiece"])
def tokenizer(request, tmp_path):
    return bpe_tokenizer() if request.param == "bpe" else sentencepiece_tokenizer(tmp_path)


# -- image processor --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, grid",
    [((1000, 100), (4, 1)), ((100, 1000), (1, 4)), ((10, 10), (1, 1)), ((64, 64), (2, 2)), ((64, 32), (2, 1))],
)
def test_tile_grid_keeps_the_aspect_ratio(size, grid):
    processor = image_processor(max_tiles=4)
    assert processor.tile_grid(*size) == grid
    out = processor(colour_image(*size))
    tiles = grid[0] * grid[1] + (1 if grid != (1, 1) else 0)  # plus the global thumbnail
    assert out["num_tiles"] == [tiles] and out["pixel_values"].shape == (tiles, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert processor.num_image_tokens(*size) == tiles * TOKENS_PER_TILE


def test_tiles_are_the_resized_image_cut_in_row_major_order():
    processor = image_processor(max_tiles=2, use_thumbnail=False)
    image = Image.new("RGB", (32, 16))
    image.paste((255, 0, 0), (0, 0, 16, 16))
    image.paste((0, 0, 255), (16, 0, 32, 16))
    pixels = processor(image)["pixel_values"]
    assert torch.allclose(pixels[0, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))  # red, normalised with 0.5 / 0.5
    assert torch.allclose(pixels[1, :, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))  # blue


def test_every_input_type_gives_the_same_pixels(tmp_path):
    processor = image_processor()
    image = colour_image(40, 24)
    path = tmp_path / "image.png"
    image.save(path)
    array = np.asarray(image)
    reference = processor(image)["pixel_values"]
    for variant in (
        array,
        array.transpose(2, 0, 1),
        array.astype(np.float32) / 255.0,
        torch.from_numpy(array.transpose(2, 0, 1).copy()),
        path,
        str(path),
        path.read_bytes(),
    ):
        assert torch.equal(processor(variant)["pixel_values"], reference), type(variant)


def test_colour_modes_are_converted_to_rgb():
    processor = image_processor()
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert torch.allclose(processor(transparent)["pixel_values"], torch.ones(1, 3, 16, 16))  # white background
    grey = Image.new("L", (16, 16), 0)
    assert torch.allclose(processor(grey)["pixel_values"], -torch.ones(1, 3, 16, 16))
    half_alpha = Image.new("LA", (16, 16), (0, 128))
    assert processor(half_alpha)["pixel_values"].shape == (1, 3, 16, 16)
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 255, 0] * 256)
    assert torch.allclose(processor(palette)["pixel_values"][0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    assert torch.allclose(processor(cmyk)["pixel_values"][0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_exif_orientation_is_honoured(tmp_path):
    image = colour_image(64, 16)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: 64x16 stored, 16x64 shown
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    processor = image_processor()
    assert processor(path)["image_sizes"] == [(64, 16)]  # (height, width) as displayed
    assert processor(path)["num_tiles"] == [processor.num_tiles(16, 64)]


def test_extreme_sizes_give_a_documented_result():
    processor = image_processor(max_tiles=6)
    assert processor(Image.new("RGB", (1, 1)))["num_tiles"] == [1]
    assert processor(Image.new("RGB", (20000, 100)))["num_tiles"] == [6 + 1]  # a row of 6 tiles and the thumbnail


def test_corrupt_and_truncated_files_are_named(tmp_path):
    processor = image_processor()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="corrupt.png"):
        processor(corrupt)
    buffer = io.BytesIO()
    colour_image(64, 64).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        processor(truncated)
    with pytest.raises(ValueError, match="not found"):
        processor(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="unsupported image type"):
        processor(3.5)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        processor(np.full((8, 8, 3), 7.0))


def test_image_processor_round_trip(tmp_path):
    processor = image_processor(max_tiles=3, use_thumbnail=False)
    processor.save_pretrained(tmp_path)
    loaded = GenieBlueImageProcessor.from_pretrained(tmp_path)
    assert (loaded.max_tiles, loaded.use_thumbnail, loaded.image_size) == (3, False, IMAGE_SIZE)
    image = colour_image(50, 20)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


# -- processor --------------------------------------------------------------------------------------------------


def make_processor(tokenizer, model, max_tiles=4):
    return GenieBlueProcessor.for_model(model.config, tokenizer, max_tiles=max_tiles)


def test_placeholders_expand_to_the_image_tokens(tokenizer):
    model = model_for(tokenizer)
    processor = make_processor(tokenizer, model)
    wide, square = colour_image(64, 16), colour_image(8, 8)
    out = processor(text=["a <image> and <image> here", "the quick brown fox"], images=[wide, square])
    ids = out["input_ids"]
    expected = (processor.image_processor.num_tiles(64, 16) + 1) * TOKENS_PER_TILE
    assert (ids[0] == model.config.image_token_id).sum() == expected
    assert (ids[1] == model.config.image_token_id).sum() == 0
    assert out["pixel_values"].shape[0] == processor.image_processor.num_tiles(64, 16) + 1
    # left padding, and the text-only row is exactly what the tokenizer itself gives
    plain = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"][0]
    assert torch.equal(ids[1, -len(plain):], plain) and out["attention_mask"][1, 0] == 0
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}


def test_nested_images_per_sample_and_decoding(tokenizer):
    model = model_for(tokenizer)
    processor = make_processor(tokenizer, model)
    out = processor(text=["<image> one", "two"], images=[[colour_image(16, 16)], []])
    decoded = processor.batch_decode(out["input_ids"], skip_special_tokens=False)
    assert decoded[0].count("<image>") == TOKENS_PER_TILE
    assert processor.post_process_image_text_to_text(out["input_ids"][1:])[0].strip().endswith("two")


def test_chat_template_with_images(tokenizer):
    model = model_for(tokenizer)
    processor = make_processor(tokenizer, model)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": colour_image(32, 16)},
                                     {"type": "text", "text": "how many shapes"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\n<image>\nhow many shapes<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    tiles = processor.image_processor.num_tiles(32, 16)
    assert inputs["pixel_values"].shape[0] == tiles
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == tiles * TOKENS_PER_TILE


def test_processor_round_trip(tokenizer, tmp_path):
    model = model_for(tokenizer)
    processor = make_processor(tokenizer, model, max_tiles=3)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is GenieBlueProcessor and type(loaded.image_processor) is GenieBlueImageProcessor
    assert loaded.image_token_id == model.config.image_token_id and loaded.image_processor.max_tiles == 3
    assert loaded.chat_template == processor.chat_template
    text, images = ["look <image> at this"], [colour_image(40, 16)]
    a, b = processor(text=text, images=images), loaded(text=text, images=images)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("two <image> markers <image>", 1, r"2 image markers .* but 1 images"),
        ("one <image> marker", 2, r"1 image markers .* but 2 images"),
        ("no marker", 1, r"0 image markers .* but 1 images"),
        ("", 0, "text is empty"),
        (None, 1, "images given without text need a prompt"),
    ],
)
def test_bad_processor_input_is_named(text, images, message):
    tokenizer = bpe_tokenizer()
    processor = make_processor(tokenizer, model_for(tokenizer))
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=[colour_image(16, 16)] * images or None)


def test_marker_typed_inside_user_text_is_caught():
    tokenizer = bpe_tokenizer()
    processor = make_processor(tokenizer, model_for(tokenizer))
    messages = [{"role": "user", "content": [{"type": "image", "image": colour_image(16, 16)},
                                             {"type": "text", "text": "what does <image> mean in HTML?"}]}]
    with pytest.raises(ValueError, match=r"2 image markers .* but 1 images"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")


def test_truncation_into_an_image_is_named():
    tokenizer = bpe_tokenizer()
    processor = make_processor(tokenizer, model_for(tokenizer))
    with pytest.raises(ValueError, match="truncation"):
        processor(text="look <image> at it", images=[colour_image(64, 16)], truncation=True, max_length=6)


# -- end to end -------------------------------------------------------------------------------------------------


def test_processor_model_generate_mixed_batch_rows_equal_single_runs(tokenizer):
    model = model_for(tokenizer)
    processor = make_processor(tokenizer, model)
    conversations = [
        ([{"role": "user", "content": "the quick brown fox"}], []),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe it"}]}],
         [colour_image(40, 16, seed=1)]),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                       {"type": "text", "text": "compare them"}]}],
         [colour_image(16, 40, seed=2), colour_image(16, 16, seed=3)]),
    ]
    prompts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in conversations]
    batch = processor(text=prompts, images=[row for _, row in conversations])
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for row, (prompt, (_, images)) in enumerate(zip(prompts, conversations)):
        alone = processor(text=prompt, images=images or None)
        single = model.generate(**alone, max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[row, -5:], single[0, -5:]), row


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=3),
    max_tiles=st.integers(1, 6),
)
def test_image_tokens_always_match_model_features(sizes, max_tiles):
    tokenizer = _shared["tokenizer"]
    model = _shared["model"]
    processor = make_processor(tokenizer, model, max_tiles=max_tiles)
    images = [colour_image(w, h) for w, h in sizes]
    out = processor(text=" ".join(["<image>"] * len(images)) + " describe", images=images)
    with torch.no_grad():
        features = model.get_image_features(out["pixel_values"]).pooler_output
        logits = model(**out).logits  # the model itself checks placeholders against features
    assert (out["input_ids"] == model.config.image_token_id).sum() == features.shape[0] * features.shape[1]
    assert torch.isfinite(logits).all()


_shared = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_model():
    _shared["tokenizer"] = bpe_tokenizer()
    _shared["model"] = model_for(_shared["tokenizer"])
    yield
    _shared.clear()


def test_high_bit_depth_greyscale_is_scaled():
    image = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))  # mode I;16
    assert torch.allclose(image_processor()(image)["pixel_values"], torch.ones(1, 3, 16, 16))
