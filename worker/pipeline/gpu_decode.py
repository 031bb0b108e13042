"""The GPU decode stage: a batch of JPEG bytes -> uint8 crops in device memory, with nvImageCodec.

Why: OpenCV on the CPU makes about 100 crops/s per core from 12 MP photos, so a 16-core node feeds
its GPU a few percent of what the engine could label; the H100/H200's JPEG engines decode far
faster. The pool threads still read each file and check its header on the CPU (allowed roots, size
caps, truncation); JPEGs are deferred here and decoded per batch with `Decoder.decode` (nvImageCodec
tries the hardware decoder, then the CUDA and hybrid ones, then its CPU one), cropped and resized
with torch on the same device (worker/pipeline/device_crop.py) and handed to the runner as one
device tensor, with no trip through the host. Other formats are decoded by OpenCV in `prepare`;
an image nvImageCodec cannot parse or decode comes back in `failed`, and the service decodes it
again with OpenCV.

The device is a parameter: on "cpu" the decoder is nvImageCodec's CPU-only backend and the tensors
are host tensors, which is how the tests run every line but the CUDA streams without a GPU.
nvImageCodec and torch are imported in load(), on the inference thread, never by a CPU worker.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

from worker.pipeline.decode_stage import Assembled, Deferred, StageInput
from worker.pipeline.device_crop import resize_region, to_model_crops
from worker.pipeline.preprocess import checked_header, decode_and_crop, plan_crop
from worker.sidecar import ModelSpec, Preprocessing

log = logging.getLogger(__name__)

# Decoded pixels per Decoder.decode call: 512 MP is 1.5 GiB of RGB, about forty 12 MP photos.
DEFAULT_MAX_DECODE_PIXELS = 512 * 1024 * 1024
# Chroma upsampled as libjpeg(-turbo) does by default, i.e. as OpenCV does. Each nvImageCodec decoder
# may honour or ignore it; bench/gpu_check.py times the 12 MP decode with and without it.
DEFAULT_OPTIONS = ":fancy_upsampling=1"


class DecodeStageError(RuntimeError):
    """The GPU decode stage cannot work on this node (no nvImageCodec, no nvJPEG, no device)."""


class GpuDecodeStage:
    name = "gpu"
    on_device = True

    def __init__(
        self,
        spec: ModelSpec,
        device: str = "cuda",
        optional: bool = False,
        max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
        options: str = DEFAULT_OPTIONS,
    ) -> None:
        self.spec = spec
        self.device_name = device
        self.optional = optional
        self.max_decode_pixels = max_decode_pixels
        self.options = options
        self.flip_channels = spec.input.channel_order != "RGB"  # the decoder gives RGB
        self._decoder: Any = None
        self._held: tuple[Any, list[Any]] | None = None  # last chunk's images until its event

    def prepare(self, data: bytes, prep: Preprocessing, max_pixels: int) -> StageInput:
        """On a pool thread: the CPU checks, then JPEGs wait for their batch; others go to OpenCV."""
        header = checked_header(data, max_pixels)
        if header is None or header.format != "JPEG":
            return decode_and_crop(data, prep, max_pixels)
        return Deferred(data, plan_crop(header, prep, allow_reduced=False), header.pixels)

    def load(self) -> None:
        """Create the decoder on the inference thread and decode a probe JPEG, so a node whose
        nvImageCodec cannot decode (no nvJPEG library, no device) fails here, not per image."""
        try:
            import torch
            from nvidia import nvimgcodec
        except ImportError as exc:
            raise DecodeStageError(f"GPU decode needs nvImageCodec and torch: {exc}") from None
        self._torch, self._codec = torch, nvimgcodec
        self._device = torch.device(self.device_name)
        self._cuda = self._device.type == "cuda"
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,  # as OpenCV: raw orientation
        )
        options = self.options
        if self._cuda:
            index = self._device.index if self._device.index is not None else torch.cuda.current_device()
            # every backend, in nvImageCodec's own order: hardware, CUDA, hybrid, then its CPU one
            self._decoder = nvimgcodec.Decoder(device_id=index, options=options)
            self._stream = torch.cuda.Stream(self._device)
        else:
            self._decoder = nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
                options=options,
            )
            self._stream = None
        probe = cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))[1].tobytes()
        image = self._decode([probe])[0]
        if image is None or tuple(image.shape) != (48, 64, 3):
            raise DecodeStageError(
                f"nvImageCodec could not decode a probe JPEG on {self._device} "
                "(on a GPU node: is the nvJPEG library installed? pip install 'resnet-labeler[gpu-decode]')"
            )

    def assemble(self, inputs: list[StageInput], staging: np.ndarray | None = None) -> Assembled:
        """Decode the deferred inputs in chunks, crop every image on the device, stack the batch.

        Host crops (formats OpenCV decoded, CPU fallbacks) are copied up; inputs that fail are
        left out and listed. The batch is ready on the caller's current stream when this returns."""
        torch = self._torch
        resized: dict[int, Any] = {}
        failed: list[int] = []
        deferred = [i for i, item in enumerate(inputs) if isinstance(item, Deferred)]
        with self._on_stream():
            for chunk in self._chunks(deferred, inputs):
                images = self._decode_safely([inputs[i].data for i in chunk])
                for index, image in zip(chunk, images, strict=True):
                    region = self._resize(image, inputs[index]) if image is not None else None
                    if region is None:
                        failed.append(index)
                    else:
                        resized[index] = region
                self._hold(images)
            batch = self._stack(inputs, resized)
        if self._cuda:
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
            if batch is not None:
                batch.record_stream(torch.cuda.current_stream(self._device))
        return Assembled(batch, sorted(failed))

    def close(self) -> None:
        self._release_held()
        self._decoder = None

    def _on_stream(self) -> Any:
        import contextlib

        return self._torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext()

    def _chunks(self, indices: list[int], inputs: list[StageInput]) -> list[list[int]]:
        """Runs of inputs whose decoded pixels (from their headers) fit one decode call."""
        chunks: list[list[int]] = []
        pixels = 0
        for index in indices:
            size = inputs[index].pixels
            if not chunks or pixels + size > self.max_decode_pixels:
                chunks.append([])
                pixels = 0
            chunks[-1].append(index)
            pixels += size
        return chunks

    def _decode(self, blobs: list[bytes]) -> list[Any]:
        """nvImageCodec images (None where it could not decode), on the stage's stream."""
        streams, positions = [], []
        for position, data in enumerate(blobs):
            try:
                streams.append(self._codec.CodeStream(data))
                positions.append(position)
            except Exception:  # noqa: BLE001 - nvImageCodec cannot parse it: OpenCV will try
                continue
        out: list[Any] = [None] * len(blobs)
        if streams:
            stream = self._stream.cuda_stream if self._cuda else 0
            images = self._decoder.decode(streams, params=self._params, cuda_stream=stream)
            for position, image in zip(positions, images, strict=True):
                out[position] = image
        return out

    def _decode_safely(self, blobs: list[bytes]) -> list[Any]:
        try:
            return self._decode(blobs)
        except Exception as exc:  # noqa: BLE001 - a failed decode call: every image goes to OpenCV
            log.warning("GPU decode of %d images failed, decoding them on the CPU: %s", len(blobs), exc)
            return [None] * len(blobs)

    def _resize(self, image: Any, item: Deferred) -> Any:
        try:
            return resize_region(self._tensor(image), item.plan)
        except Exception as exc:  # noqa: BLE001 - an odd decode result: this image goes to OpenCV
            log.info("GPU crop failed (%s), decoding on the CPU instead", exc)
            return None

    def _stack(self, inputs: list[StageInput], resized: dict[int, Any]) -> Any:
        """The batch in input order: the stage's crops converted in one go, host crops copied up."""
        torch = self._torch
        host = {i: item for i, item in enumerate(inputs) if not isinstance(item, Deferred)}
        rows = sorted([*resized, *host])
        if not rows:
            return None
        decoded = (
            to_model_crops(torch.stack([resized[i] for i in sorted(resized)]), self.flip_channels)
            if resized
            else None
        )
        if not host:
            return decoded
        uploaded = torch.from_numpy(np.stack([host[i] for i in sorted(host)])).to(self._device)
        if decoded is None:
            return uploaded
        position = {index: row for row, index in enumerate(rows)}
        batch = torch.empty((len(rows), *uploaded.shape[1:]), dtype=torch.uint8, device=self._device)
        batch[[position[i] for i in sorted(resized)]] = decoded
        batch[[position[i] for i in sorted(host)]] = uploaded
        return batch

    def _tensor(self, image: Any) -> Any:
        """A torch view of a decoded image on the stage's device (copied only if it is elsewhere)."""
        torch = self._torch
        if image.buffer_kind == self._codec.ImageBufferKind.STRIDED_HOST:
            return torch.from_numpy(np.asarray(image)).to(self._device)
        return torch.from_dlpack(image)  # zero copy; DLPack orders it after the decode on our stream

    def _hold(self, images: list[Any]) -> None:
        """Keep a chunk's decoded buffers alive until the kernels that read them have run: torch
        does not own that memory, so dropping the last reference would free it under the GPU."""
        self._release_held()
        if self._cuda:
            event = self._torch.cuda.Event()
            event.record(self._stream)
            self._held = (event, images)

    def _release_held(self) -> None:
        if self._held is not None:
            self._held[0].synchronize()
            self._held = None
