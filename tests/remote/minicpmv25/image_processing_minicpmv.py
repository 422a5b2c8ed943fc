"""MiniCPM-V 2.5's image processor (``AutoImageProcessor`` through preprocessor_config.json's
auto_map): each image becomes a downscaled overview plus a grid of slices (at most
``max_slice_nums``), every piece resized to multiples of ``patch_size``, normalized
(mean = std = 0.5), and re-laid out by ``reshape_by_patch`` to (3, patch, n_patches*patch);
``tgt_sizes`` keeps each piece's (rows, cols) of patches. ``get_slice_image_placeholder``
writes the matching text: ``<image>`` + ``<unk>`` x ``image_feature_size`` + ``</image>``
per piece, the slices inside ``<slice>...</slice>``, rows separated by newlines.
``MiniCPMVBatchFeature`` holds ragged nested lists of tensors, and its ``to()`` casts
floating tensors only."""

import math
from typing import Any, Dict, Optional, Union

import numpy as np
import PIL.Image
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import make_list_of_images, valid_images
from transformers.utils import TensorType, is_torch_device, is_torch_dtype


def recursive_converter(converter, value):
    if isinstance(value, list):
        return [recursive_converter(converter, v) for v in value]
    return converter(value)


class MiniCPMVBatchFeature(BatchFeature):
    def __init__(self, data: Optional[Dict[str, Any]] = None, tensor_type: Union[None, str, TensorType] = None):
        super().__init__(data)
        self.convert_to_tensors(tensor_type=tensor_type)

    def convert_to_tensors(self, tensor_type: Optional[Union[str, TensorType]] = None):
        if tensor_type is None:
            return self
        is_tensor, as_tensor = self._get_is_as_tensor_fns(tensor_type)

        def converter(value):
            return value if is_tensor(value) else as_tensor(value)

        for key, value in self.items():
            self[key] = recursive_converter(converter, value)
        return self

    def to(self, *args, **kwargs) -> "MiniCPMVBatchFeature":
        device = kwargs.get("device")
        if device is None and len(args) > 0:
            arg = args[0]
            if is_torch_dtype(arg):
                pass
            elif isinstance(arg, str) or is_torch_device(arg) or isinstance(arg, int):
                device = arg
            else:
                raise ValueError(f"Attempting to cast a BatchFeature to type {str(arg)}. This is not supported.")

        def cast_tensor(v):
            if torch.is_floating_point(v):
                return v.to(*args, **kwargs)
            if device is not None:
                return v.to(device=device)
            return v

        self.data = {k: recursive_converter(cast_tensor, v) for k, v in self.items()}
        return self


class MiniCPMVImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, max_slice_nums=9, scale_resolution=448, patch_size=14, **kwargs):
        super().__init__(**kwargs)
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_feature_size = kwargs.pop("image_feature_size", 64)
        self.im_start_token = kwargs.pop("im_start", "<image>")
        self.im_end_token = kwargs.pop("im_end", "</image>")
        self.slice_start_token = kwargs.pop("slice_start", "<slice>")
        self.slice_end_token = kwargs.pop("slice_end", "</slice>")
        self.unk_token = kwargs.pop("unk", "<unk>")
        self.mean = np.array(kwargs.pop("norm_mean", [0.5, 0.5, 0.5]))
        self.std = np.array(kwargs.pop("norm_std", [0.5, 0.5, 0.5]))
        self.version = kwargs.pop("version", 2.0)

    def ensure_divide(self, length, patch_size):
        return max(round(length / patch_size) * patch_size, patch_size)

    def find_best_resize(self, original_size, scale_resolution, patch_size, allow_upscale=False):
        width, height = original_size
        if (width * height > scale_resolution * scale_resolution) or allow_upscale:
            r = width / height
            height = int(scale_resolution / math.sqrt(r))
            width = int(height * r)
        return self.ensure_divide(width, patch_size), self.ensure_divide(height, patch_size)

    def get_refine_size(self, original_size, grid, scale_resolution, patch_size, allow_upscale=False):
        width, height = original_size
        grid_x, grid_y = grid
        grid_width = self.ensure_divide(width, grid_x) / grid_x
        grid_height = self.ensure_divide(height, grid_y) / grid_y
        best = self.find_best_resize((grid_width, grid_height), scale_resolution, patch_size,
                                     allow_upscale=allow_upscale)
        return best[0] * grid_x, best[1] * grid_y

    def split_to_patches(self, image, grid):
        width, height = image.size
        grid_x, grid_y = int(width / grid[0]), int(height / grid[1])
        return [[image.crop((j, i, j + grid_x, i + grid_y)) for j in range(0, width, grid_x)]
                for i in range(0, height, grid_y)]

    def get_sliced_grid(self, image_size):
        original_width, original_height = image_size
        log_ratio = math.log(original_width / original_height)
        ratio = original_width * original_height / (self.scale_resolution * self.scale_resolution)
        multiple = min(math.ceil(ratio), self.max_slice_nums)
        if multiple <= 1:
            return None
        candidates = [i for i in (multiple - 1, multiple, multiple + 1) if i != 1 and i <= self.max_slice_nums]
        grids = [[m, n // m] for n in candidates for m in range(1, n + 1) if n % m == 0]
        best_grid, min_error = [1, 1], float("inf")
        for grid in grids:
            error = abs(log_ratio - math.log(grid[0] / grid[1]))
            if error < min_error:
                best_grid, min_error = grid, error
        return best_grid

    def slice_image(self, image, max_slice_nums=9, scale_resolution=448, patch_size=14, never_split=False):
        grid = None if never_split else self.get_sliced_grid(image.size)
        if grid is None:
            best_size = self.find_best_resize(image.size, scale_resolution, patch_size, allow_upscale=True)
            return image.resize(best_size, resample=Image.Resampling.BICUBIC), [], None
        source_image = image.copy().resize(self.find_best_resize(image.size, scale_resolution, patch_size),
                                           resample=Image.Resampling.BICUBIC)
        refine_size = self.get_refine_size(image.size, grid, scale_resolution, patch_size, allow_upscale=True)
        refine_image = image.resize(refine_size, resample=Image.Resampling.BICUBIC)
        return source_image, self.split_to_patches(refine_image, grid), grid

    def get_grid_placeholder(self, grid):
        if grid is None:
            return ""
        piece = self.im_start_token + self.unk_token * self.image_feature_size + self.im_end_token
        rows = ["".join(piece for _ in range(grid[0])) for _ in range(grid[1])]
        return self.slice_start_token + "\n".join(rows) + self.slice_end_token

    def get_sliced_images(self, image):
        source_image, patches, _ = self.slice_image(image, self.max_slice_nums, self.scale_resolution,
                                                    self.patch_size)
        return [source_image] + [p for row in patches for p in row]

    def get_slice_image_placeholder(self, image_size):
        grid = self.get_sliced_grid(image_size=image_size)
        return (self.im_start_token + self.unk_token * self.image_feature_size + self.im_end_token
                + self.get_grid_placeholder(grid=grid))

    def reshape_by_patch(self, image):
        """(3, H, W) -> (3, patch, H*W/patch): each patch's rows laid side by side."""
        image = torch.from_numpy(image)
        patch_size = self.patch_size
        patches = torch.nn.functional.unfold(image, (patch_size, patch_size), stride=(patch_size, patch_size))
        patches = patches.reshape(image.size(0), patch_size, patch_size, -1)
        patches = patches.permute(0, 1, 3, 2).reshape(image.size(0), patch_size, -1)
        return patches.numpy()

    def preprocess(self, images, do_pad: Optional[bool] = True,
                   return_tensors: Optional[Union[str, TensorType]] = None) -> MiniCPMVBatchFeature:
        images = make_list_of_images(images)
        if not valid_images(images):
            raise ValueError("Invalid image type.")
        images = [image.convert("RGB") if isinstance(image, PIL.Image.Image) else image for image in images]
        new_images, tgt_sizes = [], []
        image_sizes = [image.size for image in images]
        for image in images:
            for piece in self.get_sliced_images(image):
                # the release: to_numpy_array / 255, self.normalize(mean, std), channels first
                array = (np.asarray(piece, dtype=np.float32) / 255 - self.mean) / self.std
                array = array.astype(np.float32).transpose(2, 0, 1)
                new_images.append(self.reshape_by_patch(array))
                tgt_sizes.append(np.array((array.shape[1] // self.patch_size, array.shape[2] // self.patch_size)))
        if tgt_sizes:
            tgt_sizes = np.vstack(tgt_sizes)
        return MiniCPMVBatchFeature(data={"pixel_values": [new_images], "image_sizes": [image_sizes],
                                          "tgt_sizes": [tgt_sizes]}, tensor_type=return_tensors)


AutoImageProcessor.register("MiniCPMVImageProcessor", MiniCPMVImageProcessor)
