"""Seeded batches and flips of the training set, and the host's prefetching loader.

`batch_indices` says which images, and which flips, make up global batch `step`, as a pure function of
its arguments (through `scgcm.data.order`), so a resumed run sees exactly the batches it would have
seen; `BatchLoader` turns those into float32 [steps, b, c, h, w] in [-1, 1] on a background thread.
"""

import queue
import threading

import numpy as np

from scgcm.data import order
from scgcm.data.images import to_model_range
from scgcm.data.sources import DataError


def batch_indices(step: int, *, batch_size: int, num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image indices, flip flags) of global batch `step`: example g = step·B + j is position g mod N of
    epoch g // N, in the order of `scgcm.order` (which the devices compute alike, `device_data`)."""
    if step < 0 or batch_size <= 0 or num_images <= 0 or seed < 0:
        raise DataError(
            f"batch_indices needs step, seed >= 0 and batch_size, num_images > 0, got {step}, {seed}, "
            f"{batch_size}, {num_images}"
        )
    indices, flips = order.examples(seed, np.int64(step), np.arange(batch_size, dtype=np.int64),
                                    batch_size=batch_size, num_images=num_images)
    return indices.astype(np.int64), flips


class _WorkerError:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchLoader:
    """Endless iterator of float32 [steps_per_call, batch_size/process_count, C, H, W] in [-1, 1].
    With `flip` (the default), the images `batch_indices` flags are mirrored left-right.

    Item k covers global steps start_step + k·steps_per_call + s, s < steps_per_call; process p
    takes rows [p·b, (p+1)·b) of each global batch, b = batch_size/process_count. A daemon thread
    keeps `prefetch` items ready; `close()` (or leaving a `with` block) stops it, and an exception
    in that thread is raised by the next `next()`.
    """

    def __init__(
        self,
        images: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        steps_per_call: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        flip: bool = True,
    ):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
            raise DataError(f"BatchLoader needs non-empty uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
        if process_count < 1 or batch_size < 1 or batch_size % process_count:
            raise DataError(f"batch_size {batch_size} must be a positive multiple of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is outside [0, {process_count})")
        if steps_per_call < 1 or prefetch < 1 or start_step < 0:
            raise DataError("BatchLoader needs steps_per_call >= 1, prefetch >= 1 and start_step >= 0")
        self._images, self._batch_size, self._seed = np.ascontiguousarray(images), batch_size, seed
        self._start_step, self._steps_per_call, self._flip = start_step, steps_per_call, flip
        local = batch_size // process_count
        self._rows = slice(process_index * local, (process_index + 1) * local)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="scgcm-BatchLoader", daemon=True)
        self._thread.start()

    def _make(self, call: int) -> np.ndarray:
        """Item `call`: global steps start_step + call·steps_per_call + s, this process's rows."""
        first, n = self._start_step + call * self._steps_per_call, len(self._images)
        picks = [
            batch_indices(first + s, batch_size=self._batch_size, num_images=n, seed=self._seed)
            for s in range(self._steps_per_call)
        ]
        indices = np.concatenate([i[self._rows] for i, _ in picks])
        flips = np.concatenate([f[self._rows] for _, f in picks])
        batch = self._images[indices]  # one vectorised gather: [steps·b, H, W, C]
        if self._flip:
            batch[flips] = batch[flips, :, ::-1]  # mirror left-right
        out = to_model_range(batch)
        return out.reshape(self._steps_per_call, -1, *out.shape[1:])

    def _work(self):
        try:
            call = 0
            while not self._stop.is_set():
                self._put(self._make(call))
                call += 1
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            self._put(_WorkerError(exc))

    def _put(self, item):
        while not self._stop.is_set():
            try:
                return self._queue.put(item, timeout=0.05)
            except queue.Full:
                pass

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                item = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                pass
        if isinstance(item, _WorkerError):
            self.close()
            raise item.exc
        return item

    def close(self):
        """Stop the worker and wait for it; safe to call twice."""
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
