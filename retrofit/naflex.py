"""SigLIP 2's NaFlex inputs in retrofit's pipeline, which works on batches of images (B, C, H, W).

A NaFlex vision tower (`Family.padded_patches`) takes each image as a sequence of patches at its own aspect ratio, a
batch padded to one length: ``pixel_values`` (B, N, p·p·C), ``pixel_attention_mask`` (B, N) and ``spatial_shapes``
(B, 2). retrofit's data, augmentation, training, calibration and timing pass one image tensor around; for these
models they run on square images (the centre square of each: `retrofit.data`), turned back into the patches the
checkpoint's processor makes (`patches_to_images` reads them out, `images_to_patches` puts them back: exact inverses,
in the processor's order) by a forward pre-hook on the vision tower that `take_images` adds to a loaded model. The
export itself knows nothing of this: it takes the processor's inputs, as its source does.
"""

from __future__ import annotations

import inspect
import math

import torch

from .families import FAMILIES


def square_side(num_patches: int, patch_size: int) -> int:
    """The side of the square images retrofit feeds a NaFlex model of at most `num_patches` patches per image."""
    return math.isqrt(int(num_patches)) * int(patch_size)


def images_to_patches(pixel_values: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """Images (B, C, H, W) as a NaFlex vision tower takes them: each (H/p)·(W/p) patches of p·p·C values, in the order
    of the SigLIP 2 image processor (patches row by row; in a patch, pixels row by row, channels last), none padded."""
    batch, channels, height, width = pixel_values.shape
    rows, columns = height // patch_size, width // patch_size
    patches = pixel_values[:, :, : rows * patch_size, : columns * patch_size]
    patches = patches.reshape(batch, channels, rows, patch_size, columns, patch_size).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(batch, rows * columns, -1),
        "pixel_attention_mask": torch.ones(batch, rows * columns, dtype=torch.int32, device=pixel_values.device),
        "spatial_shapes": torch.tensor([[rows, columns]] * batch, dtype=torch.long, device=pixel_values.device),
    }


def patches_to_images(pixel_values, spatial_shapes, patch_size: int) -> list[torch.Tensor]:
    """The processor's NaFlex output (each image's patches, padded) as one (C, H, W) image each."""
    images = []
    for patches, (rows, columns) in zip(torch.as_tensor(pixel_values), torch.as_tensor(spatial_shapes), strict=True):
        rows, columns = int(rows), int(columns)
        grid = patches[: rows * columns].reshape(rows, columns, patch_size, patch_size, -1)
        images.append(grid.permute(4, 0, 2, 1, 3).reshape(-1, rows * patch_size, columns * patch_size))
    return images


def _image_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: images (B, C, H, W) given as ``pixel_values`` become the patches, mask and shapes the tower
    takes (its mask parameter is ``pixel_attention_mask`` or, in older releases, ``attention_mask``)."""
    pixels = args[0] if args else kwargs.get("pixel_values")
    if pixels is None or pixels.dim() != 4:
        return None  # the processor's own inputs: as they are
    inputs = images_to_patches(pixels, module.config.patch_size)
    kwargs = {
        **kwargs,
        "pixel_values": inputs["pixel_values"],
        module._retrofit_mask_name: inputs["pixel_attention_mask"],
        "spatial_shapes": inputs["spatial_shapes"],
    }
    return (), kwargs


def take_images(model: torch.nn.Module) -> torch.nn.Module:
    """Let `model`'s NaFlex vision towers (if it has any) take images (B, C, H, W) as `pixel_values`, as the other
    families do; returns `model`. Processor outputs (patch sequences) pass unchanged."""
    towers = {name for family in FAMILIES.values() for name in family.padded_patch_towers}
    for module in model.modules():  # by its class or the one it derives from (the merged Siglip2VisionModel's)
        named = {cls.__name__ for cls in type(module).__mro__}
        if named & towers and not hasattr(module, "_retrofit_mask_name"):
            parameters = inspect.signature(module.forward).parameters
            module._retrofit_mask_name = (
                "pixel_attention_mask" if "pixel_attention_mask" in parameters else "attention_mask"
            )
            module.register_forward_pre_hook(_image_inputs, with_kwargs=True)
    return model
