"""End to end through `panoptic-batch run`, as a user runs it: images/s, GPU busy, memory, start-up.

    python -m bench.e2e_gpu --device cuda --json e2e.json          # a lent GPU (bench/gpu_check.sh)
    python -m bench.e2e_gpu --device cpu --model detr-r50 --weights random --images 6 --small 2 \\
        --min-size 128 --max-size 160 --configs fp32:2 --seed-images 2      # a smoke run on a CPU

What it does, in one process that starts `panoptic-batch run` as child processes:

1. Writes COCO-like JPEGs into a work folder: mostly 640×480, a fifth in other COCO sizes
   (portrait, 500×375, 612×612, 640×360…), smooth gradients with noise (distinct content for
   `--unique` images, repeated under other names up to `--images`).
2. Weights: `informative` (default; seeded weights calibrated so that queries differ, saved as a
   checkpoint file: the GPU machine cannot download the published one) with a threshold chosen so
   that about `--kept` queries per image pass it, or `random`, or a local checkpoint path.
3. The honest seed baseline, in this process on the same device: the reference's own steps at
   batch 1, fp32 (TF32 off): PIL decode, resize and normalise on the CPU, the full model (all
   100 queries through the mask head, no folding, NCHW) on the device, then the reference's
   postprocessing placement (`plain_postprocess(on_device=True)`: upsampling and argmax on the
   device, the id map's PIL resize, segments and PNG on the host). Writing files is not counted.
4. Per precision:batch-size config, `panoptic-batch run` over a small job (`--small` images) and
   the large one (`--images`), each into a fresh SQLite database and output folder, timed from
   the child's start to its exit. Marginal images/s = (large − small) / (T_large − T_small): the
   start-up (imports, model build, weights, first shapes) cancels out. Also: seconds to the first
   PNG written (an upper bound on "time to the first batch"), the child's peak RSS (VmHWM), the
   GPU's utilisation sampled with NVML (pynvml) at 20 Hz during the large run's steady state
   (between its first and last output): the fraction of samples with the GPU busy (> 0%, the SM
   column of `nvidia-smi dmon`) and the mean, and the device memory used above what it used
   before the child started (NVML, device-wide).
5. Prints a markdown table and writes everything as JSON (`--json`).

Never timed tests: the figures go into BENCHMARKS.md by hand, with the date, card, torch and commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.pipeline_bench import gradient_jpeg

REPO = Path(__file__).resolve().parents[1]

ODD_SIZES = [(640, 427), (612, 612), (640, 360), (427, 640), (333, 500), (640, 512)]

# BENCH_SWITCH_INTERVAL (seconds): the child's sys.setswitchinterval, for A/B runs of how long a
# thread may hold the GIL before another gets it (Python's default 0.005).
RUN_ENTRY = ("import os, sys; from scheduler.cli import main; sys.argv[0] = 'panoptic-batch'; "
             "sys.setswitchinterval(float(os.environ.get('BENCH_SWITCH_INTERVAL', sys.getswitchinterval()))); main()")


def image_sizes(n: int) -> list[tuple[int, int]]:
    """n (width, height): 4 in 5 are 640×480, the rest portrait, 500×375 and odd COCO sizes."""
    sizes = []
    for i in range(n):
        if i % 5 == 4:
            sizes.append(ODD_SIZES[(i // 5) % len(ODD_SIZES)] if i % 10 == 9 else (480, 640))
        else:
            sizes.append((640, 480))
    return sizes


def coco_like_jpeg(seed: int, width: int, height: int) -> bytes:
    """Smooth colour fields with a few flat "objects" with hard edges, and noise: decodes like a photo."""
    return gradient_jpeg(seed, width, height, objects=4)


def write_images(folder: Path, n: int, unique: int) -> list[Path]:
    """n JPEGs in `folder` (img00000.jpg…): `unique` distinct ones per size, repeated."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[tuple[int, tuple[int, int]], bytes] = {}
    paths = []
    for i, size in enumerate(image_sizes(n)):
        key = (i % unique, size)
        if key not in made:
            made[key] = coco_like_jpeg(1000 + i % unique, *size)
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(made[key])
        paths.append(path)
    return paths


class GpuSampler:
    """NVML samples (time, utilisation %, device memory used) in a thread, 20 per second."""

    def __init__(self, index: int):
        import pynvml                        # nvidia-ml-py, present on the GPU machine
        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def memory_used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self):
        while not self._stop.wait(0.05):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append((time.perf_counter(), int(util.gpu), self.memory_used()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_sampler(device: torch.device) -> GpuSampler | None:
    if device.type != "cuda":
        return None
    try:
        return GpuSampler(device.index if device.index is not None else 0)
    except Exception as exc:                      # no pynvml: the rest still runs
        print(f"GPU sampling unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def count_pngs(folder: Path) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if e.name.endswith(".png"))
    except FileNotFoundError:
        return 0


def run_job(args, source: Path, n: int, precision: str, batch_size: int, weights: str, threshold: float,
            work: Path, tag: str, device: torch.device, settings: dict[str, str] | None = None,
            profile: str | None = None) -> dict:
    """One `panoptic-batch run` over `source` (n images) in a child process; its figures."""
    dest = work / f"out-{tag}"
    log_path = work / f"run-{tag}.log"
    env = {**os.environ, "PANOPTIC_DATABASE_URL": f"sqlite:///{work / f'jobs-{tag}.db'}",
           "PYTHONUNBUFFERED": "1", **(settings or {})}
    command = [sys.executable, "-c", RUN_ENTRY, "run", str(source), "--dest", str(dest),
               "--model", args.model, "--weights", weights, "--threshold", f"{threshold:.6f}",
               "--device", args.device, "--precision", precision, "--batch-size", str(batch_size),
               "--min-size", str(args.min_size), "--max-size", str(args.max_size),
               "--chunk-size", str(args.chunk_size)]
    if profile:
        # py-spy samples every thread's Python stack (idle ones too) 100 times a second: where
        # the model thread, the io and postprocessing threads spend the run.
        # --gil (PROFILE_GIL=1): only the thread holding the GIL is sampled, i.e. who keeps it.
        mode = ["--gil"] if os.environ.get("PROFILE_GIL") == "1" else ["--idle"]
        command = [profile, "record", "--rate", "100", *mode, "--threads", "--nonblocking", "--format", "raw",
                   "--output", str(work / f"profile-{tag}.txt"), "--"] + command
    sampler = make_sampler(device)
    memory_before = sampler.memory_used() if sampler else None
    first = last = None
    done_at_first = 0
    rss = None
    with open(log_path, "w") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        with (sampler if sampler else _Null()):
            while child.poll() is None:
                rss = peak_rss_kib(child.pid) or rss
                done = count_pngs(dest)
                now = time.perf_counter()
                if done and first is None:
                    first, done_at_first = now, done
                if done >= n and last is None:
                    last = now
                time.sleep(0.05)
        end = time.perf_counter()
    if child.returncode != 0 or count_pngs(dest) != n:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"run {tag} exited {child.returncode} with {count_pngs(dest)} of {n} PNGs:\n{tail}")
    last = last or end
    row = {"images": n, "seconds": end - start, "first_output_s": (first - start) if first else None,
           "peak_rss_mib": rss / 1024 if rss else None,
           # From the first PNG written to the last: start-up and exit left out within one run.
           "steady_images_per_s": (n - done_at_first) / (last - first) if first and last > first else None}
    if sampler and sampler.samples:
        steady = [s for s in sampler.samples if first is not None and first <= s[0] <= last] or sampler.samples
        row.update(gpu_busy_fraction=sum(u > 0 for _, u, _ in steady) / len(steady),
                   gpu_util_mean=statistics.fmean(u for _, u, _ in steady),
                   gpu_samples=len(steady),
                   gpu_memory_peak_mib=(max(m for _, _, m in sampler.samples) - memory_before) / 2**20)
    row["stage_ms_median"] = stage_medians(work / f"jobs-{tag}.db")
    if not args.keep_outputs:
        shutil.rmtree(dest, ignore_errors=True)
    return row


def stage_medians(database: Path) -> dict[str, float]:
    """The medians of the per-image timings `run` recorded (decode, model, postprocess, upload ms):
    where an image's time went, as the product itself measures it."""
    from sqlalchemy import create_engine, select

    from storage.jobs import TIMING_FIELDS
    from storage.schema import Image
    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as db:
            rows = db.execute(select(*(getattr(Image, name) for name in TIMING_FIELDS))
                              .where(Image.state == "succeeded")).all()
    finally:
        engine.dispose()
    return {name: statistics.median(r[i] for r in rows if r[i] is not None)
            for i, name in enumerate(TIMING_FIELDS) if any(r[i] is not None for r in rows)}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def seed_baseline(args, device: torch.device, weights: str, threshold: float, paths: list[Path]) -> dict:
    """The reference's own steps at batch 1, fp32, on `device` (see the module docstring)."""
    from bench.postprocess_bench import plain_postprocess
    from worker.model import create_model
    from worker.preprocess import decode_image, image_tensor, pad_batch, processed_size

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = create_model(args.model, weights=weights).to(device).eval()
    data = [p.read_bytes() for p in paths]

    def one(raw: bytes) -> dict:
        im = decode_image(raw)
        size = processed_size(im.width, im.height, args.min_size, args.max_size)
        batch = pad_batch([image_tensor(im, size, "cpu")])          # the reference's CPU transforms
        with torch.inference_mode():
            outputs = model(batch.images.to(device), batch.padding_mask.to(device))
            return plain_postprocess(outputs, [size], [(im.height, im.width)], threshold, on_device=True)[0]

    for raw in data[:2]:
        one(raw)                                                     # warm-up
    times, segments = [], []
    for raw in data:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        result = one(raw)
        times.append(time.perf_counter() - t)
        segments.append(len(result["segments_info"]))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ms = statistics.median(times) * 1e3
    return {"images": len(data), "ms_per_image_median": ms, "images_per_s": 1e3 / ms,
            "segments_per_image_mean": statistics.fmean(segments)}


def predictor_rate(args, device: torch.device, weights: str, threshold: float, paths: list[Path],
                   precision: str, batch_size: int) -> dict:
    """The same precision and batch size in this process, with no files, SQL or uploads: decoded
    640×480 images through `Predictor.predict_batches` (staging, model, postprocessing up to the PNG
    bytes). The gap between this and `run` is what the job around the model costs."""
    from worker.predictor import ModelConfig, Predictor
    from worker.preprocess import RGBImage, decode_image

    decoded = [RGBImage.from_pil(decode_image(p.read_bytes())) for p in paths]
    images = [im for im in decoded if im.size == (640, 480)]
    predictor = Predictor(ModelConfig(model=args.model, weights=weights, threshold=threshold,
                                      min_size=args.min_size, max_size=args.max_size, device=str(device),
                                      precision=precision, batch_size=batch_size))
    batches = [images[i:i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]
    for _ in predictor.predict_batches(batches[:2]):            # warm-up: kernels, allocator
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model_ms = []
    for results in predictor.predict_batches(batches):
        model_ms += [r["model_ms"] for r in results]
    seconds = time.perf_counter() - start
    predictor.close()
    del predictor
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n = sum(len(b) for b in batches)
    return {"images": n, "images_per_s": n / seconds, "model_ms_median": statistics.median(model_ms)}


def prepare_weights(args, device: torch.device, work: Path, paths: list[Path]) -> tuple[str, float, list[int]]:
    """The --weights value the runs use, the threshold, and the kept counts on sample images."""
    if args.weights == "informative":
        from bench.informative import save_informative_weights
        weights = str(save_informative_weights(args.model, work / "informative.pt"))
    else:
        weights = args.weights
    if args.threshold is not None:
        return weights, args.threshold, []
    from bench.inference_bench import choose_threshold
    from worker.predictor import ModelConfig, Predictor
    from worker.preprocess import decode_image
    predictor = Predictor(ModelConfig(model=args.model, weights=weights, min_size=args.min_size,
                                      max_size=args.max_size, device=str(device)))
    images = [decode_image(p.read_bytes()) for p in paths[:8]]
    threshold, kept = choose_threshold(predictor, images, args.kept)
    predictor.close()
    del predictor
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return weights, threshold, kept


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="detr-r101")
    parser.add_argument("--weights", default="informative", help="informative, random or a checkpoint path")
    parser.add_argument("--threshold", type=float, default=None,
                        help="default: chosen so that about --kept queries per image pass (informative "
                             "weights), else 0.85")
    parser.add_argument("--kept", type=int, default=15)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--images", type=int, default=1024, help="the large job")
    parser.add_argument("--small", type=int, default=128, help="the small job (its first images)")
    parser.add_argument("--unique", type=int, default=64, help="distinct images per size")
    parser.add_argument("--configs", default="fp32:16,tf32:16,bf16:16",
                        help="precision:batch-size[:batches in flight[:postprocessing threads]][@NAME=VALUE...], "
                             "comma-separated (PANOPTIC_BATCHES_IN_FLIGHT, default 1; PANOPTIC_POSTPROCESS_THREADS, "
                             "default 8; @NAME=VALUE: more environment for the child, e.g. "
                             "@BENCH_SWITCH_INTERVAL=0.001 or @OMP_NUM_THREADS=1)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed-images", type=int, default=16)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--predictor-images", type=int, default=0,
                        help="also time the predictor alone (in this process, no files or SQL) on the 640×480 "
                             "ones of the first N images, per config")
    parser.add_argument("--profile", default=None, metavar="PY_SPY",
                        help="the py-spy program: the first config's large run is recorded again under it "
                             "(WORKDIR/profile-*.txt, collapsed stacks; not counted in the table)")
    args = parser.parse_args(argv)
    if not 0 <= args.small < args.images:
        parser.error("--small must be between 0 (no small job: steady rates only) and --images")
    if args.weights == "random" and args.threshold is None:
        args.threshold = 0.85
    configs = []
    for item in args.configs.split(","):
        item, *settings = item.split("@")
        fields = item.split(":")
        precision, batch, in_flight, threads = fields + ["16", "1", "8"][len(fields) - 1:]
        configs.append((precision, int(batch), int(in_flight), int(threads),
                        dict(setting.split("=", 1) for setting in settings)))
    device = torch.device(args.device)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="e2e-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        large = write_images(work / "large", args.images, args.unique)
        small_folder = work / "small"
        small_folder.mkdir(exist_ok=True)
        for path in large[:args.small]:
            shutil.copyfile(path, small_folder / path.name)
        print(f"{args.images} images written in {time.perf_counter() - started:.1f} s", flush=True)
        weights, threshold, kept = prepare_weights(args, device, work, large)
        print(f"weights {args.weights}, threshold {threshold:.4f}, kept per sample image {kept}", flush=True)
        seed = seed_baseline(args, device, weights, threshold, large[:args.seed_images])
        print(f"seed path: {seed['ms_per_image_median']:.1f} ms per image "
              f"({seed['images_per_s']:.1f} images/s, fp32, batch 1)", flush=True)
        rows = []
        save(args, device, threshold, kept, seed, rows, partial=True)
        for precision, batch_size, in_flight, threads, settings in configs:
            tag = (f"{precision}-b{batch_size}" + (f"-f{in_flight}" if in_flight != 1 else "")
                   + (f"-t{threads}" if threads != 8 else ""))
            tag += "".join(f"-{name.lower()}{value}" for name, value in settings.items())
            env = {"PANOPTIC_BATCHES_IN_FLIGHT": str(in_flight), "PANOPTIC_POSTPROCESS_THREADS": str(threads),
                   **settings}
            small = None
            if args.small:
                small = run_job(args, small_folder, args.small, precision, batch_size, weights, threshold, work,
                                tag + "-small", device, env)
            big = run_job(args, work / "large", args.images, precision, batch_size, weights, threshold, work,
                          tag + "-large", device, env)
            marginal = (args.images - args.small) / max(1e-9, big["seconds"] - small["seconds"]) if small else None
            rate = marginal or big["steady_images_per_s"] or 0.0
            row = {"precision": precision, "batch_size": batch_size, "in_flight": in_flight, "settings": settings,
                   "postprocess_threads": threads,
                   "small": small, "large": big,
                   "marginal_images_per_s": marginal,
                   "startup_s": small["seconds"] - args.small / marginal if small else None,
                   "vs_seed": rate / seed["images_per_s"]}
            if args.predictor_images and not settings:          # settings reach the child only
                row["predictor"] = predictor_rate(args, device, weights, threshold, large[:args.predictor_images],
                                                  precision, batch_size)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile and len(rows) == 1:
                try:
                    run_job(args, work / "large", args.images, precision, batch_size, weights, threshold, work,
                            tag + "-profiled", device, env, profile=args.profile)
                except Exception as exc:          # the profile is a diagnosis: the table goes on
                    print(f"profiled run failed: {exc}", flush=True)
            save(args, device, threshold, kept, seed, rows, partial=len(rows) < len(configs))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    report = save(args, device, threshold, kept, seed, rows, partial=False)
    print(f"\n{report['device']}, torch {torch.__version__}, {args.model} {args.min_size}/{args.max_size}, "
          f"{args.images} images (small job {args.small}), threshold {threshold:.3f}, commit {report['commit']}")
    print("| precision | batch | in flight | threads | marginal images/s | steady images/s | × seed | start-up s "
          "| first PNG s | GPU busy | GPU util mean | GPU memory MiB | peak RSS MiB | predictor alone images/s "
          "| median ms decode/model/post/upload |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for r in rows:
        big = r["large"]
        label = r["precision"] + "".join(f" {k}={v}" for k, v in r.get("settings", {}).items())
        print(f"| {label} | {r['batch_size']} | {r['in_flight']} | {r['postprocess_threads']} "
              f"| {fmt(r['marginal_images_per_s'], '.1f')} | {fmt(big['steady_images_per_s'], '.1f')} "
              f"| {r['vs_seed']:.1f} | {fmt(r['startup_s'], '.1f')} "
              f"| {fmt((r['small'] or big)['first_output_s'], '.1f')} "
              f"| {fmt(big.get('gpu_busy_fraction'), '.0%')} | {fmt(big.get('gpu_util_mean'), '.0f')} "
              f"| {fmt(big.get('gpu_memory_peak_mib'), '.0f')} | {fmt(big.get('peak_rss_mib'), '.0f')} "
              f"| {fmt(r.get('predictor', {}).get('images_per_s'), '.1f')} "
              f"| {'/'.join(format(v, '.1f') for v in big.get('stage_ms_median', {}).values()) or 'n/a'} |")
    print(f"seed path (reference placement, fp32, batch 1): {seed['ms_per_image_median']:.1f} ms per image")
    return report


def save(args, device: torch.device, threshold: float, kept: list[int], seed: dict, rows: list[dict],
         partial: bool) -> dict:
    """The report so far, written to --json (after every config: a run cut short keeps its rows)."""
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name if props else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__, "python": platform.python_version(),
        # The device machine's copy of .git may be stale: the commit given by the caller wins.
        "commit": os.environ.get("PANOPTIC_BENCH_COMMIT") or git_commit(),
        "cores": os.cpu_count(), "args": vars(args), "threshold": threshold, "kept_sample": kept,
        "seed": seed, "rows": rows, "partial": partial,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
