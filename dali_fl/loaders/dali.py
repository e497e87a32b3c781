"""The DALI loader: one pipeline per run, fed batch by batch from the store by row gathers.

The host's only per-batch work is `images[rows]` (or, with `data_on_gpu`, a torch gather on
the GPU); resizing (to `image_size`), padding, cropping, mirroring, normalization and the
NHWC->NCHW transpose run as DALI operators on the loader's device.

Reuse across clients: the pipeline's two external sources read from a `_Feed` that holds one
epoch's plan. A new epoch first drains whatever an abandoned epoch left queued, then swaps in
the new feed, then calls `reset()`; the `run()` calls after that prefetch from the new feed
only. The loop drives `pipe.run()` itself rather than DALIGenericIterator, whose `reset()`
prefetches at once (swapping after it, or `auto_reset`, serves the next client one epoch of
the previous client's data) and whose default last-batch policy pads by repeating samples.
Short last batches pass through: a batch-mode external source may return fewer rows than the
pipeline's batch size.

Hand-off to torch is zero-copy: with DALI's default (dynamic) executor an output buffer stays
alive while anything references it, so `torch.from_dlpack` wraps it without a copy, and on the
GPU DLPack orders torch's current stream after DALI's work instead of waiting on the host.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator, Union

import numpy as np
import torch

from dali_fl.errors import DaliFlError
from dali_fl.loaders.base import Loader, LoaderConfig, Served, device_index
from dali_fl.loaders.order import PAD, Batch
from dali_fl.loaders.resize import interpolation

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

log = logging.getLogger(__name__)
Rows = Union[np.ndarray, torch.Tensor]  # a gathered uint8 NHWC batch, on the host or the GPU

GPU_HEADROOM = 1 << 30  # bytes left free beside the resident split: DALI's buffers, the model
UPLOAD_ROWS = 512  # rows per host->GPU chunk when uploading the split: bounds host memory


class _Feed:
    """One epoch's plan, read in step by the image source and the metadata source."""

    def __init__(self, plan: list[Batch], gather: Callable[[np.ndarray], Rows],
                 labels: np.ndarray, augment: bool) -> None:
        # Two cursors over one plan: each source advances its own, so neither depends on the
        # order in which DALI calls them.
        self._for_images, self._for_meta = iter(plan), iter(plan)
        self._gather, self._labels, self._augment = gather, labels, augment

    def images(self) -> Rows:
        """The next batch's uint8 HWC rows (StopIteration at the end of the epoch)."""
        return self._gather(next(self._for_images).rows)

    def meta(self) -> tuple[np.ndarray, ...]:
        """The next batch's rows, labels, mirror flags [and slice anchors relative to the image]."""
        b = next(self._for_meta)
        meta = (b.rows, self._labels[b.rows], b.flip.astype(np.int32))
        return meta + ((b.offsets - PAD).astype(np.int32),) if self._augment else meta


class _FeedSlot:
    """What the pipeline's sources are bound to; the loader swaps the feed inside it."""

    def __init__(self) -> None:
        self.feed = _Feed([], np.asarray, np.zeros(0, np.int64), False)

    def images(self) -> Rows:
        return self.feed.images()

    def meta(self) -> tuple[np.ndarray, ...]:
        return self.feed.meta()


def resize_node(images, cfg: LoaderConfig):
    """`fn.resize` to the target side with the settings closest to `prep`'s offline resize (not equal to it).

    prep runs torch's antialiased `F.interpolate(align_corners=False)` (a port of Pillow's resampler):
    half-pixel centres and a triangle filter widened by the scale factor when shrinking. DALI's `fn.resize`
    with `interp_type=INTERP_LINEAR`, `antialias=True`, the default `mode` (an explicit size) and no ROI
    uses the same centres and the same weights inside the image, but where the widened filter reaches past
    the edge DALI repeats the edge pixel while Pillow renormalizes the weights over the pixels inside; no
    fn.resize option (min_filter, INTERP_TRIANGULAR, float output, subpixel_scale) changes that. Measured on
    uint8, bilinear (`pytest -s tests/test_resize_to.py -k border`): enlarging (32->224) is within one level
    everywhere, even on random pixels; shrinking is within one level except on the outermost rows and
    columns, where random pixels 64->32 differ by up to 17 levels (91.5% of all values within one level);
    smooth synthetic data 224->64 stays within one. Bicubic maps to INTERP_CUBIC (Keys, a=-0.5, as Pillow)
    but Pillow also rounds and clips its horizontal pass to uint8: 32->224 gives 98.2% within one level, up
    to 11, on synthetic data and 93.2%, up to 23, on random pixels. Where equality with the store matters,
    use the memmap loader (prep's own kernel on the CPU: bit-exact) or a store prep resized.
    """
    from nvidia.dali import fn, types

    interp = types.INTERP_CUBIC if interpolation(cfg.store) == "bicubic" else types.INTERP_LINEAR
    return fn.resize(images, size=[cfg.resize, cfg.resize], interp_type=interp, antialias=True)


def build_pipeline(cfg: LoaderConfig, slot: _FeedSlot) -> "Pipeline":
    """The DALI graph: gathered rows -> [resize] -> [padded crop] -> mirror + normalize -> CHW on the device."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    on_gpu = cfg.device.type == "cuda"
    pipe = Pipeline(batch_size=cfg.batch_size, num_threads=cfg.workers.dali_threads,
                    device_id=device_index(cfg.device), prefetch_queue_depth=2, seed=0,
                    exec_dynamic=True)  # dynamic executor: outputs may outlive the next run()
    size = cfg.image_size  # the output side: crop and padding keep their meaning after a resize
    mean, std = cfg.norm.scaled(255.0)
    if not pipe.exec_dynamic:  # the zero-copy hand-off to torch is only safe with this executor
        raise RuntimeError("DALI did not enable its dynamic executor; outputs would be recycled")
    with pipe:
        # DALI copies each gathered batch into its own buffer (pinned in a GPU pipeline, so the
        # upload is asynchronous); no_copy with a ring of pinned gather buffers could save that
        # memcpy but needs a GPU to validate.
        images = fn.external_source(source=slot.images, batch=True, layout="HWC", dtype=types.UINT8,
                                    device="gpu" if cfg.data_on_gpu else "cpu")
        # rows, labels, mirror flags [, slice anchors]: CPU data, as argument inputs must be.
        meta_types = [types.INT64, types.INT64, types.INT32]
        meta_types += [types.INT32] if cfg.augment else []
        rows, labels, flip, *anchor = fn.external_source(
            source=slot.meta, batch=True, num_outputs=len(meta_types), dtype=meta_types)
        if on_gpu and not cfg.data_on_gpu:
            images = images.gpu()
        if cfg.resize is not None:  # on the loader's device: the GPU in a GPU pipeline
            images = resize_node(images, cfg)
        if cfg.augment:
            # Anchors may be negative: out-of-bounds reads are zero pixels, i.e. the padding of
            # RandomCrop(padding=4), applied before normalization as there.
            # The window's shape as an explicit CPU node: a bare array would become a GPU constant
            # for a GPU slice, and GPU anchor/shape inputs cost a device-to-host sync per batch.
            shape = types.Constant(np.array([size, size], np.int32), device="cpu")
            images = fn.slice(images, anchor[0], shape, axes=[0, 1], out_of_bounds_policy="pad",
                              fill_values=0)
        images = fn.crop_mirror_normalize(
            images, mirror=flip, mean=mean, std=std, output_layout="CHW",
            dtype=types.FLOAT16 if cfg.out_dtype == torch.float16 else types.FLOAT)
        pipe.set_outputs(images, labels.gpu() if on_gpu else labels, rows)
    pipe.build()
    return pipe


def upload_split(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy a whole uint8 split to GPU memory once, or refuse when it would not fit."""
    need = int(images.nbytes)
    free, _ = torch.cuda.mem_get_info(device)
    if need + GPU_HEADROOM > free:
        gib = 2.0**30
        raise DaliFlError(f"--data-on-gpu needs {(need + GPU_HEADROOM) / gib:.2f} GiB on {device} "
                          f"({need / gib:.2f} GiB of images + {GPU_HEADROOM / gib:.0f} GiB of "
                          f"headroom) but only {free / gib:.2f} GiB is free; drop --data-on-gpu")
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    for a in range(0, len(images), UPLOAD_ROWS):
        chunk = np.ascontiguousarray(images[a:a + UPLOAD_ROWS])
        out[a:a + UPLOAD_ROWS].copy_(torch.from_numpy(chunk))
    log.info("data_on_gpu: %.2f GiB of images resident on %s", need / 2**30, device)
    return out


def _to_torch(out) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor sharing its memory (DLPack, no copy)."""
    return torch.from_dlpack(out.as_tensor())


class DaliLoader(Loader):
    """External-source DALI pipeline, built once and re-fed per client and epoch."""

    kind = "dali"
    supports_data_on_gpu = True

    def __init__(self, cfg: LoaderConfig) -> None:
        if cfg.data_on_gpu and cfg.device.type != "cuda":
            raise DaliFlError("--data-on-gpu needs a CUDA device; it keeps the split in GPU memory")
        super().__init__(cfg)
        self._labels = cfg.store.labels(cfg.split)
        self._gather = self._gpu_gather(cfg) if cfg.data_on_gpu else self._host_gather(cfg)
        self._slot = _FeedSlot()
        self._pipe = build_pipeline(cfg, self._slot)
        self._in_flight = False  # an epoch was started and has not reached StopIteration

    @staticmethod
    def _host_gather(cfg: LoaderConfig) -> Callable[[np.ndarray], np.ndarray]:
        images = cfg.store.row_reader(cfg.split)
        return images.__getitem__  # the one piece of per-batch CPU work

    def _gpu_gather(self, cfg: LoaderConfig) -> Callable[[np.ndarray], torch.Tensor]:
        self._resident = upload_split(cfg.store.images(cfg.split), cfg.device)
        dev = cfg.device
        # DALI copies the gathered batch on torch's current stream, after the gather. The row indices go up pinned
        # and non-blocking: a pageable copy synchronises the stream, so the host waited for the previous step's
        # queued compute on every batch, inside the data-wait timer (DALI calls this in the training thread).
        return lambda rows: self._resident.index_select(
            0, torch.from_numpy(rows).pin_memory().to(dev, non_blocking=True))

    def _feed(self, plan: list[Batch]) -> _Feed:
        return _Feed(plan, self._gather, self._labels, self.cfg.augment)

    def _run(self) -> tuple:
        """One pipeline step; on the GPU the outputs are ordered on torch's current stream."""
        if self.cfg.device.type == "cuda":
            return self._pipe.run(torch.cuda.current_stream(self.cfg.device))
        return self._pipe.run()

    def _drain(self) -> None:
        """Consume what an abandoned epoch left queued, so that nothing of it reaches the next."""
        self._slot.feed = self._feed([])
        try:
            while True:
                self._run()
        except StopIteration:
            pass
        self._in_flight = False

    def _batches(self, plan: list[Batch], rows: np.ndarray) -> Iterator[Served]:
        if self._in_flight:
            self._drain()
        self._slot.feed = self._feed(plan)  # swap first ...
        self._pipe.reset()  # ... then reset: the next run() prefetches from the new feed only
        self._in_flight = True
        while True:
            try:
                images, labels, served = self._run()
            except StopIteration:
                self._in_flight = False
                return
            yield _to_torch(images), _to_torch(labels), np.asarray(served.as_tensor()).copy()

    def close(self) -> None:
        self._pipe = None  # DALI frees its threads and buffers when the pipeline is collected
        self._resident = None
