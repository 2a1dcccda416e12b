"""Input pipeline throughput: the synchronous NumPy batcher's loop against grain with 0 and N worker processes.

Two data sets, each read through its real training view:
(a) Fashion-MNIST held in memory (`data.load('fashion_mnist', 'train')`: Debian's IDX files, prepared once),
    padded crop and flip, global batch `--fmnist-batch`;
(b) ImageNet-sized JPEGs: `--jpeg-images` synthetic photo-like images (smooth colour fields plus noise, sides
    drawn from 300-500 x 250-450 pixels, JPEG quality 90) written once as an array_record file of
    (label, JPEG bytes) records, decoded with PIL in `get` as a tfds data source does without OpenCV, then
    `transforms.imagenet_train` (random-resized crop to 224, flip) and normalisation, global batch `--jpeg-batch`.
Every pipeline makes the same batches (tests/test_grain.py checks that bit for bit). 'numpy' is the loop of the
batcher grain replaced: `make_batch` for each batch in turn, in this process, nothing ahead. 'grain w=0' computes
batches in a thread of this process; 'grain w=N' in N spawned processes. Startup (time to the first batch: worker
processes spawned and importing agmc_jax, the epoch's order, the first batch itself) is reported apart from the
steady rate (images/s over the second half of the batches; the overall rate, startup included, is in the JSON).
CPU milliseconds per image (every process of the pipeline, over the same half) is the cost that does not depend on
what else runs on the cores: on a shared machine the rates do. Nothing consumes the batches, so a rate is what the
pipeline alone delivers; Fashion-MNIST is timed again with a simulated training step after each batch
(`--fmnist-step-ms`, a sleep: it holds neither a core nor the GIL, as a step on an accelerator), where computing
the next batch meanwhile (grain) pays and the NumPy loop cannot.

Run: `python experiments/bench_input.py --workers 1,2`.
"""
import argparse
import io
import os
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from array_record.python import array_record_data_source, array_record_module
from PIL import Image

from agmc_jax import data
from agmc_jax.data import transforms
from agmc_jax.data.pipeline import BatchPlan, make_batch, plan_steps

from results_io import write_result  # experiments/results_io.py: JSON under experiments/results/


def _pil(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def _opencv(blob: bytes) -> np.ndarray:
    import cv2
    cv2.setNumThreads(1)  # one image per call: the pipeline's parallelism is its worker processes
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _simplejpeg(blob: bytes) -> np.ndarray:
    import simplejpeg
    return simplejpeg.decode_jpeg(blob, colorspace="RGB")


# The JPEG decoders compared: PIL (what tfds's data source uses without OpenCV), OpenCV (what it uses when
# opencv-python-headless is installed), simplejpeg (libjpeg-turbo without the rest).
DECODERS = {"pil": (_pil, "PIL"), "opencv": (_opencv, "cv2"), "simplejpeg": (_simplejpeg, "simplejpeg")}


def available_decoders() -> list:
    """The decoders whose module this interpreter has."""
    found = []
    for name, (_, module) in DECODERS.items():
        try:
            __import__(module)
        except ImportError:
            continue
        found.append(name)
    return found


class JpegRecords(data.Source):
    """(label int32 little-endian, JPEG bytes) records of an array_record file, decoded by `decoder` on `get`; the
    reader opens in each process that reads (it is not pickled to worker processes)."""

    def __init__(self, path: str, decoder: str = "pil"):
        self.path, self.decoder, self._reader = path, decoder, None

    def __getstate__(self):
        return {"path": self.path, "decoder": self.decoder, "_reader": None}

    def _records(self):
        if self._reader is None:
            self._reader = array_record_data_source.ArrayRecordDataSource([self.path])
        return self._reader

    def __len__(self) -> int:
        return len(self._records())

    def get(self, indices: np.ndarray) -> tuple:
        records = self._records().__getitems__([int(i) for i in indices])
        decode = DECODERS[self.decoder][0]
        images = [decode(r[4:]) for r in records]
        return images, np.asarray([struct.unpack("<i", r[:4])[0] for r in records], np.int32)


def synthetic_photo(rng: np.random.Generator) -> np.ndarray:
    """An RGB image of ImageNet's typical size whose JPEG size and decoding cost resemble a photo's: a smooth
    colour field (a small random image resized up) with noise."""
    height, width = int(rng.integers(250, 451)), int(rng.integers(300, 501))
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(field, np.int16) + rng.normal(0, 12, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_jpegs(path: Path, count: int, seed: int = 0) -> dict:
    """Write `count` synthetic JPEG records to `path`; returns their mean size in bytes and pixels."""
    rng, sizes, pixels = np.random.default_rng(seed), [], []
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(count):
        image = synthetic_photo(rng)
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format="JPEG", quality=90)
        writer.write(struct.pack("<i", i % 1000) + encoded.getvalue())
        sizes.append(encoded.tell())
        pixels.append(image.shape[0] * image.shape[1])
    writer.close()
    return {"images": count, "mean_jpeg_bytes": float(np.mean(sizes)), "mean_pixels": float(np.mean(pixels))}


def numpy_loop(plan: BatchPlan, batches: int):
    """The NumPy batcher that grain replaced: each batch made in turn in this process."""
    return (make_batch(plan, i) for i in range(batches))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its live children (grain's workers)."""
    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            total += sum(process.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return total


def measure(make_iterator, batch_size: int, batches: int, step_s: float = 0.0) -> dict:
    """Time to the first batch (startup); images/s over the second half of the batches (steady: what workers
    computed ahead while the others started is spent by then) and over all of them, startup included; CPU
    milliseconds per image over the second half (all processes: on shared cores the load-independent cost).
    `step_s`: a simulated training step after each batch that holds no CPU nor GIL (as an accelerator's)."""
    began = time.perf_counter()
    iterator = make_iterator()
    arrivals, half = [], batches // 2
    for k in range(batches):
        next(iterator)
        time.sleep(step_s)
        arrivals.append(time.perf_counter())
        if k == half:
            cpu = cpu_seconds()
    cpu = cpu_seconds() - cpu
    getattr(iterator, "close", lambda: None)()
    images = (batches - 1 - half) * batch_size
    return {"startup_s": arrivals[0] - began, "images_per_s": images / (arrivals[-1] - arrivals[half]),
            "cpu_ms_per_image": 1e3 * cpu / images,
            "overall_images_per_s": batches * batch_size / (arrivals[-1] - began)}


def bench(label: str, source, spec, batch_size: int, batches: int, workers: list, repeats: int, step_ms: float = 0.0
          ) -> list:
    """Every pipeline on one data set, `repeats` times in turn (interleaved); the best rate and median startup."""
    plan = BatchPlan(source, spec, batch_size, True, 0, 0, data.steps_per_epoch(source, batch_size) * batch_size, 0, 1)
    batches = max(3, min(batches, plan_steps(plan)))
    pipelines = {"numpy": lambda: numpy_loop(plan, batches)}
    for count in workers:
        pipelines[f"grain w={count}"] = (lambda count=count: data.batches(
            source, spec, batch_size, train=True, process_index=0, process_count=1, workers=count))
    runs = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, make in pipelines.items():
            runs[name].append(measure(make, batch_size, batches, step_ms / 1e3))
    base = max(r["images_per_s"] for r in runs["numpy"])
    rows = []
    step = f", a {step_ms:g} ms step after each" if step_ms else ""
    print(f"\n{label}: {batches} batches of {batch_size}{step}, best of {repeats}")
    print(f"{'pipeline':<12} {'images/s':>9} {'x numpy':>8} {'cpu ms/img':>11} {'startup s':>10}")
    for name, results in runs.items():
        rate = max(r["images_per_s"] for r in results)
        cpu = min(r["cpu_ms_per_image"] for r in results)
        startup = float(np.median([r["startup_s"] for r in results]))
        print(f"{name:<12} {rate:>9.0f} {rate / base:>8.2f} {cpu:>11.3f} {startup:>10.2f}")
        rows.append({"dataset": label, "step_ms": step_ms, "pipeline": name, "images_per_s": rate,
                     "ratio_to_numpy": rate / base,
                     "cpu_ms_per_image": cpu, "startup_s": startup, "runs": results})
    return rows


def decoder_rows(path: Path, count: int, repeats: int) -> list:
    """CPU milliseconds per image of each available decoder on the first `count` records, against the whole training
    view of an image (decode, random-resized crop to 224, flip, normalise), and whether its pixels equal PIL's."""
    blobs = [r[4:] for r in array_record_data_source.ArrayRecordDataSource([str(path)]).__getitems__(list(range(count)))]
    spec, rng = data.dataset_spec("imagenet2012"), np.random.default_rng(0)
    uniforms = rng.random((count, 64))
    reference = [_pil(b) for b in blobs[:16]]

    def view(decode):
        for blob, u in zip(blobs, uniforms):
            image = transforms.preprocess([decode(blob)], "imagenet", spec.input_shape, u[None])
            transforms.normalize(image, spec.mean, spec.std)

    rows = []
    print(f"\nJPEG decoders, {count} images, best of {repeats} (CPU ms per image, this process)")
    print(f"{'decoder':<12} {'decode':>8} {'view':>8} {'decode share':>13} {'same pixels as PIL':>19}")
    for name in available_decoders():
        decode = DECODERS[name][0]
        same = all(np.array_equal(decode(b), r) for b, r in zip(blobs, reference))
        timings = {}
        for part, work in (("decode", lambda: [decode(b) for b in blobs]), ("view", lambda: view(decode))):
            best = np.inf
            for _ in range(repeats):
                began = time.process_time()
                work()
                best = min(best, time.process_time() - began)
            timings[part] = 1e3 * best / count
        print(f"{name:<12} {timings['decode']:>8.3f} {timings['view']:>8.3f} "
              f"{timings['decode'] / timings['view']:>13.2f} {str(same):>19}")
        rows.append({"decoder": name, "decode_cpu_ms": timings["decode"], "view_cpu_ms": timings["view"],
                     "same_pixels_as_pil": same})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="grain worker counts besides 0 (comma-separated)")
    parser.add_argument("--fmnist-batch", type=int, default=128)
    parser.add_argument("--fmnist-batches", type=int, default=429, help="at most one epoch (429 at batch 128)")
    parser.add_argument("--fmnist-step-ms", type=float, default=1.0,
                        help="Fashion-MNIST is also timed with a simulated step of this many ms after each batch")
    parser.add_argument("--jpeg-images", type=int, default=2048)
    parser.add_argument("--jpeg-batch", type=int, default=64)
    parser.add_argument("--jpeg-batches", type=int, default=32, help="at most one epoch (32 at the defaults)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every pipeline, interleaved (best kept)")
    parser.add_argument("--decoder", choices=tuple(DECODERS), default="pil",
                        help="the JPEG decoder of the pipelines' rows (every available one is also timed alone)")
    args = parser.parse_args()
    workers = [0] + [int(w) for w in args.workers.split(",") if w]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other jobs share these cores: rates are "
          "noisy)")
    fashion, spec = data.load("fashion_mnist", "train"), data.dataset_spec("fashion_mnist")
    rows = [row for step_ms in (0.0, args.fmnist_step_ms) for row in bench(
        "fashion_mnist (in memory)", fashion, spec, args.fmnist_batch, args.fmnist_batches, workers, args.repeats,
        step_ms)]
    with tempfile.TemporaryDirectory(prefix="bench-input-") as scratch:
        path = Path(scratch) / "jpegs.array_record"
        began = time.perf_counter()
        jpegs = write_jpegs(path, args.jpeg_images)
        print(f"\nwrote {jpegs['images']} JPEGs (mean {jpegs['mean_jpeg_bytes'] / 1e3:.0f} kB, "
              f"{jpegs['mean_pixels'] / 1e3:.0f} kpixels) in {time.perf_counter() - began:.0f} s")
        decoders = decoder_rows(path, min(256, args.jpeg_images), args.repeats)
        rows += bench(f"imagenet-sized JPEGs (array_record, {args.decoder})", JpegRecords(str(path), args.decoder),
                      data.dataset_spec("imagenet2012"), args.jpeg_batch, args.jpeg_batches, workers, args.repeats)
    write_result("bench_input", time.strftime("%Y-%m-%d_%H%M%S"),
                 {"args": vars(args), "load_average": os.getloadavg()[0], "jpegs": jpegs, "decoders": decoders,
                  "rows": rows})


if __name__ == "__main__":
    main()
