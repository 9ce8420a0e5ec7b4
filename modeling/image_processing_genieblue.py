"""GenieBlue image processor: SigLIP-style normalisation with dynamic-resolution tiling.

As in BlueLM-V / GenieBlue's "dynamic resolution processor", each image is resized to the grid of square tiles
(at most ``max_tiles``) whose aspect ratio is closest to the image's, cut into those tiles, and (when it needs more
than one tile) followed by a global thumbnail. A wide receipt thus becomes a row of tiles and a tall screenshot a
column, each tile at the vision tower's native resolution.

Every tile becomes ``image_tokens_per_tile`` placeholder tokens after the projector's token merging, so the number
of placeholders an image needs is ``num_tiles * image_tokens_per_tile``.

This file is Hub remote code: it imports only PIL, torch, transformers and the standard library (array inputs are
taken through the array protocol, so numpy is not imported). It derives from ``BaseImageProcessor`` and implements
``preprocess`` itself (PIL resizing, no torchvision), which every transformers 5.x release accepts from remote code.
"""

import io
import os
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import logging


logger = logging.get_logger(__name__)


SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def best_tile_grid(width, height, max_tiles, tile_size):
    """``(columns, rows)`` with ``columns * rows <= max_tiles`` whose aspect ratio is closest to ``width / height``.

    Ties go to the larger grid when the image has enough pixels to fill it (InternVL's rule), so a big image is not
    squeezed into one tile when four would show it at the same aspect ratio.
    """
    aspect = width / height
    grids = sorted(
        {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles},
        key=lambda grid: (grid[0] * grid[1], grid[0]),
    )
    best, best_diff = (1, 1), float("inf")
    for columns, rows in grids:
        diff = abs(aspect - columns / rows)
        if diff < best_diff - 1e-12:
            best, best_diff = (columns, rows), diff
        elif abs(diff - best_diff) <= 1e-12 and width * height > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def _first_frame(image, source):
    """An animated image (GIF, APNG, WebP) is used as its first frame; say so, since the rest is dropped."""
    frames = getattr(image, "n_frames", 1)
    if getattr(image, "is_animated", False) and frames > 1:
        logger.warning("%s is an animated image with %d frames: only its first frame is used", source, frames)
        image.seek(0)
    return image


def load_image(image):
    """A PIL image from a PIL image, a path, bytes, a numpy array or a torch tensor, EXIF orientation applied."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                _first_frame(opened, path)
                opened.load()
                image = ImageOps.exif_transpose(opened)
                image.load()
        except FileNotFoundError:
            raise ValueError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"cannot read image file {path}: it is corrupt, truncated or not an image ({error})") from None
        return image
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                _first_frame(opened, "image bytes")
                opened.load()
                return ImageOps.exif_transpose(opened).copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"cannot decode image bytes: corrupt, truncated or not an image ({error})") from None
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(_first_frame(image, "the image"))
    if isinstance(image, torch.Tensor):
        return _array_to_pil(image.detach().cpu())
    if hasattr(image, "__array__"):  # numpy and other array-protocol objects, copied (they may be read-only)
        return _array_to_pil(torch.tensor(image))
    raise ValueError(
        f"unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes, a numpy array or a tensor"
    )


def _uint8_to_pil(tensor):
    """A PIL image from an ``(H, W)`` or ``(H, W, C)`` uint8 tensor."""
    mode = {2: "L"}.get(tensor.ndim) or {3: "RGB", 4: "RGBA"}[tensor.shape[-1]]
    height, width = tensor.shape[:2]
    return Image.frombytes(mode, (width, height), tensor.contiguous().numpy().tobytes())


def _array_to_pil(array):
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.permute(1, 2, 0)  # channels first -> channels last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"image arrays must be (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels, got {tuple(array.shape)}"
        )
    if array.is_floating_point():
        if array.numel() and (array.min() < 0 or array.max() > 1):
            raise ValueError("floating-point image arrays must hold values in [0, 1]")
        array = torch.round(array.double() * 255)
    return _uint8_to_pil(array.clamp(0, 255).to(torch.uint8))


def to_rgb(image):
    """RGB, compositing any transparency onto white (RGBA, LA, P with transparency); CMYK and grey converted."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth: scale to 8 bits by the bit depth
        # Pillow opens 16-bit greyscale (PNG, TIFF) as "I;16" or "I" and float images as "F" (taken as 0..1); the
        # scale is the format's full range, never the image's own brightest pixel.
        full_range = 1.0 if image.mode == "F" else 65535.0
        width, height = image.size
        values = torch.frombuffer(bytearray(image.convert("F").tobytes()), dtype=torch.float32).view(height, width)
        image = _uint8_to_pil(torch.round(values / full_range * 255.0).clamp(0, 255).to(torch.uint8))
    return image.convert("RGB")


class GenieBlueImageProcessor(BaseImageProcessor):
    r"""Dynamic-resolution image processor for GenieBlue.

    Args:
        image_size: side in pixels of one tile (the vision tower's input size).
        max_tiles: most tiles one image is cut into (the thumbnail not counted).
        use_thumbnail: add a global thumbnail tile to images cut into more than one tile.
        image_tokens_per_tile: placeholder tokens per tile (``(image_size / patch_size / downsample_ratio) ** 2``).
        image_mean, image_std: normalisation (SigLIP: 0.5, 0.5).
        resample: PIL resampling filter for resizing (default bicubic).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size=384,
        max_tiles=6,
        use_thumbnail=True,
        image_tokens_per_tile=144,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        resample=int(Image.Resampling.BICUBIC),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if not isinstance(max_tiles, int) or max_tiles < 1:
            raise ValueError(f"max_tiles must be a positive integer, got {max_tiles!r}")
        if not isinstance(image_tokens_per_tile, int) or image_tokens_per_tile < 1:
            raise ValueError(f"image_tokens_per_tile must be a positive integer, got {image_tokens_per_tile!r}")
        self.image_size = image_size
        self.max_tiles = max_tiles
        self.use_thumbnail = bool(use_thumbnail)
        self.image_tokens_per_tile = image_tokens_per_tile
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.resample = int(resample)

    @classmethod
    def from_model_config(cls, config, **kwargs):
        """An image processor whose tile size and tokens per tile match a ``GenieBlueConfig``."""
        return cls(
            image_size=config.vision_image_size, image_tokens_per_tile=config.image_tokens_per_tile, **kwargs
        )

    def tile_grid(self, width, height):
        return best_tile_grid(width, height, self.max_tiles, self.image_size)

    def num_tiles(self, width, height):
        """Tiles an image of this size is cut into, thumbnail included."""
        columns, rows = self.tile_grid(width, height)
        return columns * rows + (1 if self.use_thumbnail and columns * rows > 1 else 0)

    def num_image_tokens(self, width, height):
        """Placeholder tokens an image of this size needs."""
        return self.num_tiles(width, height) * self.image_tokens_per_tile

    def _tiles(self, image):
        size = self.image_size
        columns, rows = self.tile_grid(*image.size)
        resized = image.resize((columns * size, rows * size), resample=self.resample)
        tiles = [
            resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(columns)
        ]
        if self.use_thumbnail and len(tiles) > 1:
            tiles.append(image.resize((size, size), resample=self.resample))
        return tiles

    def _normalize(self, tile):
        width, height = tile.size
        pixels = torch.frombuffer(bytearray(tile.tobytes()), dtype=torch.uint8).view(height, width, 3)
        pixels = pixels.permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        return (pixels - mean) / std

    def preprocess(self, images, return_tensors="pt", **kwargs):
        """``pixel_values`` (all tiles of all images, in order, ``(tiles, 3, S, S)``) and ``num_tiles`` per image."""
        if kwargs:
            raise ValueError(f"GenieBlueImageProcessor got unexpected arguments: {sorted(kwargs)}")
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        pixel_values, num_tiles, image_sizes = [], [], []
        for index, raw in enumerate(images):
            image = to_rgb(load_image(raw))
            width, height = image.size
            if width < 1 or height < 1:
                raise ValueError(f"image {index} is empty ({width}x{height})")
            tiles = self._tiles(image)
            pixel_values.extend(self._normalize(tile) for tile in tiles)
            num_tiles.append(len(tiles))
            image_sizes.append((height, width))
        size = self.image_size
        stacked = torch.stack(pixel_values) if pixel_values else torch.zeros((0, 3, size, size))
        data = {"pixel_values": stacked, "num_tiles": num_tiles, "image_sizes": image_sizes}
        if return_tensors not in ("pt", None):
            raise ValueError(f"GenieBlueImageProcessor returns torch tensors only, got return_tensors={return_tensors!r}")
        return BatchFeature(data=data)


GenieBlueImageProcessor.register_for_auto_class()

__all__ = ["GenieBlueImageProcessor", "best_tile_grid"]
