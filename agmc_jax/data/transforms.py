"""Image preprocessing in numpy: CIFAR-style crops and flips, ImageNet crops, normalisation.

Random transforms take their randomness as a (batch, UNIFORMS) array of uniforms drawn for the
whole global batch, so an example's augmentation does not depend on how the batch is split over
processes.
"""
import math

import numpy as np
from PIL import Image

from agmc_jax.errors import InputShapeError

PAD = 4  # pixels of zero padding before a random crop back to the original size
ATTEMPTS = 10  # tries of the random-resized crop before falling back to a centre crop
SCALE = (0.08, 1.0)  # random-resized crop: fraction of the image area
RATIO = (3 / 4, 4 / 3)  # random-resized crop: aspect ratio (width / height)
RESIZE_RATIO = 256 / 224  # evaluation: shorter side resized to crop size times this, then centre crop
UNIFORMS = 2 * ATTEMPTS + 3  # per example: (scale, ratio) per attempt, crop position, flip


def crop(images: np.ndarray, uniforms: np.ndarray, flip: bool) -> np.ndarray:
    """Pad by PAD pixels, crop back to the original size at a random offset, optionally flip left-right."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    top = np.floor(uniforms[:, 0] * (2 * PAD + 1)).astype(int)
    left = np.floor(uniforms[:, 1] * (2 * PAD + 1)).astype(int)
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = left[:, None] + np.arange(w)
    if flip:
        cols = np.where((uniforms[:, 2] < 0.5)[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows, cols[:, None, :]]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An HWC uint8 image resized bilinearly to (height, width)."""
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out.reshape(height, width, image.shape[2])


def random_resized_box(height: int, width: int, u: np.ndarray) -> tuple:
    """(top, left, h, w) of an Inception-style random crop of an image, drawn from the uniforms `u`."""
    area = height * width
    for k in range(ATTEMPTS):
        target = area * (SCALE[0] + u[2 * k] * (SCALE[1] - SCALE[0]))
        ratio = math.exp(math.log(RATIO[0]) + u[2 * k + 1] * (math.log(RATIO[1]) - math.log(RATIO[0])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(u[-3] * (height - h + 1)), int(u[-2] * (width - w + 1)), h, w
    h, w = height, width
    if width / height < RATIO[0]:
        h = min(height, round(width / RATIO[0]))
    elif width / height > RATIO[1]:
        w = min(width, round(height * RATIO[1]))
    return (height - h) // 2, (width - w) // 2, h, w


def imagenet_train(image: np.ndarray, u: np.ndarray, size: int) -> np.ndarray:
    """Random-resized crop to size x size, then a left-right flip with probability 1/2."""
    top, left, h, w = random_resized_box(image.shape[0], image.shape[1], u)
    out = resize(image[top:top + h, left:left + w], size, size)
    return out[:, ::-1] if u[-1] < 0.5 else out


def imagenet_eval(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size * 256/224, then take the centre size x size crop."""
    height, width = image.shape[:2]
    scale = round(size * RESIZE_RATIO) / min(height, width)
    h, w = max(size, round(height * scale)), max(size, round(width * scale))
    top, left = (h - size) // 2, (w - size) // 2
    return resize(image, h, w)[top:top + size, left:left + size]


def preprocess(images, augment: str, shape: tuple, uniforms: np.ndarray | None) -> np.ndarray:
    """uint8 NHWC images ready to normalise: augmented when `uniforms` is given, else the evaluation view.

    For 'imagenet', `images` may be a list of differently sized HWC images and `shape` is the output (H, W, C).
    """
    if augment == "imagenet":
        size = shape[0]
        if uniforms is None:
            out = [imagenet_eval(image, size) for image in images]
        else:
            out = [imagenet_train(image, u, size) for image, u in zip(images, uniforms)]
        return np.stack(out) if out else np.zeros((0, *shape), np.uint8)
    images = np.asarray(images)
    if uniforms is None or augment == "none":
        return images
    return crop(images, uniforms, flip=augment == "crop_flip")


def normalize(images: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """float32 (pixel / 255 - mean) / std per channel."""
    if images.shape[-1] != len(mean):
        raise InputShapeError(f"images have {images.shape[-1]} channels but the dataset has {len(mean)}")
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    shift = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return images.astype(np.float32) * scale - shift
