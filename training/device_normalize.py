"""uint8 pixels from the data loader, rescaled and normalised on the accelerator.

The image processor's float32 output is four times the bytes of the uint8 image it came from. Leaving the last two
steps (rescale, normalise) to the device makes the workers' output, the pinned copies and the host-to-device transfer
four times smaller, and the arithmetic is a handful of element-wise kernels on the GPU. Resizing, cropping and RGB
conversion stay in the image processor, so the result equals its float output up to float rounding.

- `pixel_batch` is what the collators call: floats (the default), uint8, or no pixels at all (a feature cache
  provides `vision_features` instead).
- `DeviceNormalizeMixin` finishes the job in the Trainer, right after the batch reaches the device.
"""

from collections.abc import Sequence

import torch

PIXEL_FORMATS = ("float", "uint8", "none")


def uint8_pixels(image_processor, images: Sequence) -> torch.Tensor:
    """Resized (and cropped) images as the processor would return them, before rescaling: `(B, C, H, W)` uint8."""
    pixels = image_processor(images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    if pixels.dtype != torch.uint8:
        # Backends that resize in float return integral values in [0, 255] up to interpolation rounding.
        pixels = pixels.round().clamp(0, 255).to(torch.uint8)
    return pixels


def pixel_batch(image_processor, images: Sequence, pixel_format: str = "float") -> dict[str, torch.Tensor]:
    """`{"pixel_values": ...}` in the requested format, or `{}` for `"none"` (features come from a cache)."""
    if pixel_format == "float":
        return {"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"]}
    if pixel_format == "uint8":
        return {"pixel_values": uint8_pixels(image_processor, images)}
    if pixel_format == "none":
        return {}
    raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")


def _per_channel(value, channels: int) -> list[float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * channels
    if len(values) != channels:
        raise ValueError(f"the image processor gives {len(values)} mean/std values for {channels} channels")
    return values


def normalize_pixels(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 `(B, C, H, W)` -> float32, rescaled and normalised with `image_processor`'s own settings.

    `x * rescale / std - mean / std` per channel: python scalars, so no small host-to-device copies per step.
    """
    channels = pixels.shape[1]
    rescale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
    if image_processor.do_normalize:
        mean = _per_channel(image_processor.image_mean, channels)
        std = _per_channel(image_processor.image_std, channels)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    out = pixels.to(torch.float32)
    for c in range(channels):
        out[:, c].mul_(rescale / std[c]).sub_(mean[c] / std[c])
    return out


class DeviceNormalizeMixin:
    """Trainer mixin: uint8 `pixel_values` are normalised once the batch is on the device (training and evaluation).

    Float pixels pass through untouched, so the mixin is inert unless the collator sends uint8. The image processor
    is the Trainer's `processing_class` (or its `image_processor`).
    """

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        pixels = inputs.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8:
            image_processor = getattr(self.processing_class, "image_processor", self.processing_class)
            if not hasattr(image_processor, "image_mean"):
                raise ValueError(
                    "uint8 pixel_values need the image processor's mean/std: pass processing_class=<processor or "
                    "image processor> to the Trainer, or use pixel_format='float' in the collator"
                )
            inputs = {**inputs, "pixel_values": normalize_pixels(pixels, image_processor)}
        return inputs


__all__ = ["PIXEL_FORMATS", "DeviceNormalizeMixin", "normalize_pixels", "pixel_batch", "uint8_pixels"]
