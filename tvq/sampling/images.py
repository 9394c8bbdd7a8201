"""Laying out sampled ImageNet64 subpixels as a PNG grid."""

from __future__ import annotations

import io
import math

import numpy as np

from tvq.data.vocab import BYTE_OFFSET

# ImageNet64 images are stored as 64 x 64 x 3 subpixel bytes in raster order.
IMAGE_SHAPE = (64, 64, 3)
SUBPIXELS_PER_IMAGE = math.prod(IMAGE_SHAPE)
# Background between the images of the grid.
GAP_PIXELS = 2


def subpixel_images(tokens: np.ndarray) -> np.ndarray:
    """Map token ids [B, n] (n <= 12,288) to images [B, 64, 64, 3] uint8.

    Subpixels beyond the n given are black, and so are special ids (pad, eos, unk),
    which a model can draw but which are no pixel value.
    """
    B, n = tokens.shape
    assert n <= SUBPIXELS_PER_IMAGE, (tokens.shape, SUBPIXELS_PER_IMAGE)
    values = np.where(tokens >= BYTE_OFFSET, tokens - BYTE_OFFSET, 0).astype(np.uint8)
    flat = np.zeros((B, SUBPIXELS_PER_IMAGE), np.uint8)
    flat[:, :n] = values
    return flat.reshape(B, *IMAGE_SHAPE)


def image_grid(images: np.ndarray) -> np.ndarray:
    """Tile images [B, H, W, 3] into a near-square grid on a white background."""
    B, H, W, C = images.shape
    columns = math.ceil(math.sqrt(B))
    rows = math.ceil(B / columns)
    height = rows * H + (rows + 1) * GAP_PIXELS
    width = columns * W + (columns + 1) * GAP_PIXELS
    grid = np.full((height, width, C), 255, np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top = GAP_PIXELS + row * (H + GAP_PIXELS)
        left = GAP_PIXELS + column * (W + GAP_PIXELS)
        grid[top : top + H, left : left + W] = image
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an [H, W, 3] uint8 image as PNG."""
    from matplotlib import image as mpimg

    buffer = io.BytesIO()
    mpimg.imsave(buffer, image, format="png")
    return buffer.getvalue()
