"""The decoder is part of the view (issue 20, item 2): how a view's pixels are made from the
image bytes and the stored crop and flip, and where.

- ``"pil"``: libjpeg-turbo on the CPU (``views.decode_image``) and torch's CPU resize, one
  image at a time, in the loader workers or the extractor's threads.
- ``"nvjpeg"``: batched nvJPEG decode (torchvision's ``decode_jpeg`` on a CUDA device) and the
  crop, resize and flip on the GPU, in the process that trains or extracts. The workers only
  read bytes. Its pixels are not libjpeg-turbo's (chroma upsampling, IDCT and GPU resampling
  differ: max 66 levels, mean 1.8 on ImageNet-like JPEGs, ``benchmarks/results/gpu_run1.json``).

A cache records the decoder its teacher's views were made with (``ViewConfig.decoder``) and a
few of those views' pixels (:mod:`hgkd.storage.fingerprint`); stage two renders with the same
decoder and checks the pixels before training.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import HgkdError
from .view_config import DECODERS
from .views import decode_image, is_jpeg, render_crop

DEVICE_DECODERS = frozenset({"nvjpeg"})  # pixels are made on the training device, not in workers


def check_decoder(name: str, device: torch.device, option: str = "--decoder") -> None:
    """A decoder the run can use on ``device``; one line naming the option otherwise."""
    if name not in DECODERS:
        raise HgkdError(f"{option} {name!r}: choose one of {', '.join(DECODERS)}")
    if name == "nvjpeg" and device.type != "cuda":
        raise HgkdError(f"{option} nvjpeg decodes on a CUDA device and this run uses {device}; use {option} pil "
                        f"(a cache made with nvjpeg needs a GPU in stage two too)")


def image_hw(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels; raises when unreadable."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return height, width


def decode_on_device(encoded: list[bytes], device: torch.device) -> list[torch.Tensor | Exception]:
    """Each image as uint8 (3, H, W) on ``device``, or the exception that decoding it raised.

    JPEGs go through one batched ``decode_jpeg`` call (nvJPEG on CUDA, libjpeg-turbo on the
    CPU); when the batch fails, each is decoded alone so only the bad ones fail. Other
    formats are decoded on the CPU (``decode_image``) and copied to the device."""
    out: list[torch.Tensor | Exception] = [ValueError("not decoded")] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if is_jpeg(data)]
    if jpegs:
        tensors = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as err:
                    decoded.append(err)
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i in sorted(set(range(len(encoded))) - set(jpegs)):
        try:
            out[i] = decode_image(encoded[i]).to(device)
        except Exception as err:  # noqa: BLE001 - reported per image by the caller
            out[i] = err
    return out


@dataclass
class PendingViews:
    """Views whose pixels are made on the device (decoder ``nvjpeg``): each source image's
    bytes once, and per view the image it comes from, its crop box and flip."""

    encoded: list[bytes]  # one per source image
    image_v: list[int]  # per view: position in ``encoded``
    crop_v4: torch.Tensor  # (V, 4) int32: top, left, height, width in source pixels
    flip_v: torch.Tensor  # (V,) bool
    img_size: int
    interpolation: str

    def __len__(self) -> int:
        return len(self.image_v)

    def render(self, device: torch.device) -> torch.Tensor:
        """uint8 (V, 3, img_size, img_size) on ``device``; raises HgkdError naming an undecodable image."""
        images = decode_on_device(self.encoded, device)
        bad = next((i for i, image in enumerate(images) if isinstance(image, Exception)), None)
        if bad is not None:
            raise HgkdError(f"an image of this batch cannot be decoded on {device} ({images[bad]}); "
                            f"check the data set")
        views = [render_crop(images[i], tuple(int(v) for v in self.crop_v4[n]), bool(self.flip_v[n]),
                             self.img_size, self.interpolation) for n, i in enumerate(self.image_v)]
        return torch.stack(views)
