"""The `panoptic-batch` command line.

Why one file: it is the command group, the options its commands share (model_options,
job_options) and the commands that wire those options to the modules doing the work (submit,
dispatch, embedded, progress); commands with logic of their own (export, evaluate, report, prune)
have their own files and are registered at the end.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from worker.config import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE,
                           DEFAULT_THRESHOLD, DEFAULT_VARIANT, PRECISIONS, VARIANTS, ModelConfig,
                           parse_batch_size)
from worker.queue import broker_url
from worker.text import printable
from storage.objects import mask_url

from .errors import EXIT_LABEL_MAP, EXIT_USAGE, EXIT_WEIGHTS, CommandError, OneLineErrors, broker_error
from .jobstore import find_job, open_store, refuse_a_newer_database_schema
from .submit import DEFAULT_CHUNK_SIZE


class BatchSizeType(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        try:
            return parse_batch_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


BATCH_SIZE = BatchSizeType()


def model_options(func):
    """The options accepted wherever a model runs (predict, submit, run)."""
    options = [
        click.option("--model", type=click.Choice(sorted(VARIANTS)), default=DEFAULT_VARIANT, show_default=True,
                     help="DETR panoptic variant."),
        click.option("--weights", default="official", show_default=True,
                     help="official (published checkpoint, cached by torch hub), random (seeded, for smoke "
                          "runs), a local path (.pth or .safetensors), s3://bucket/key, an https:// URL, or a "
                          "folder or s3:// prefix with a transformers DetrForSegmentation checkpoint."),
        click.option("--categories", type=click.Path(dir_okay=False), default=None,
                     help="Label map of the weights: a JSON list of COCO panoptic categories (id, name, isthing, "
                          "optional color, supercategory) or a COCO panoptic file holding one. Default: the "
                          "weights' own (a transformers checkpoint's id2label), else the 133 COCO categories."),
        click.option("--threshold", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT_THRESHOLD,
                     show_default=True,
                     help="Keep queries whose class confidence is above this."),
        click.option("--batch-size", type=BATCH_SIZE, default="auto", show_default=True,
                     help="Images per forward pass, or auto: 16 on CUDA, 1 on the CPU."),
        click.option("--min-size", type=click.IntRange(min=1), default=DEFAULT_MIN_SIZE, show_default=True,
                     help="Resize the shortest side to this many pixels…"),
        click.option("--max-size", type=click.IntRange(min=1), default=DEFAULT_MAX_SIZE, show_default=True,
                     help="…keeping the longest side at most this many."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
                     help="Refuse images larger than this (decompression bombs)."),
        click.option("--max-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_BYTES, show_default=True,
                     help="Refuse image files larger than this, before downloading them."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(sorted(PRECISIONS)), default="fp32", show_default=True,
                     help="Autocast precision on CUDA (the CPU runs fp32)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_config(options: dict) -> ModelConfig:
    return ModelConfig(**{key: options[key] for key in ModelConfig.__dataclass_fields__ if key in options})


def cell(text) -> str:
    """Data for a rich table cell: control characters escaped, rich markup ("[red]") shown as typed."""
    from rich.markup import escape
    return escape(printable(text))


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="panoptic-batch")
def main():
    """Bulk panoptic segmentation with DETR: folders or S3 in, COCO-panoptic PNG + JSON out."""


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <stem>.png and <stem>.json per image.")
@model_options
def predict(images, out_dir, **options):
    """Segment IMAGE... on this machine, no queue: writes OUT/<stem>.png and OUT/<stem>.json."""
    from storage.objects import ObjectStoreError, read_bytes
    from worker.heap import keep_freed_memory
    from worker.labels import LabelMapError
    from worker.model import WeightsError
    from worker.output import result_document
    from worker.predictor import Predictor
    from worker.preprocess import ImageDecodeError, decode_image

    config = model_config(options)
    keep_freed_memory()
    try:
        predictor = Predictor(config)
    except WeightsError as exc:
        raise CommandError(str(exc), EXIT_WEIGHTS) from exc
    except LabelMapError as exc:
        raise CommandError(str(exc), EXIT_LABEL_MAP) from exc
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [Path(uri).stem for uri in images]
    duplicates = {s for s in stems if stems.count(s) > 1}
    if duplicates:
        raise click.ClickException(f"several images would write the same outputs: {', '.join(sorted(duplicates))}")

    failed = []
    decoded = []
    for uri in images:
        try:
            decoded.append((uri, decode_image(read_bytes(uri), config.max_pixels, config.max_bytes)))
        except (ImageDecodeError, ObjectStoreError, OSError) as exc:
            failed.append(uri)
            click.echo(f"failed: {printable(uri)}: {printable(exc)}", err=True)
    chunks = [decoded[start:start + predictor.batch_size] for start in range(0, len(decoded), predictor.batch_size)]
    for chunk, results in zip(chunks, predictor.predict_batches([im for _, im in chunk] for chunk in chunks)):
        for (uri, image), result in zip(chunk, results):
            stem = Path(uri).stem
            (out_dir / f"{stem}.png").write_bytes(result["png"])
            document = result_document(result, f"{stem}.png", uri, predictor.model_info)
            (out_dir / f"{stem}.json").write_text(json.dumps(document, indent=1))
            click.echo(f"{printable(uri)} → {printable(out_dir / (stem + '.png'))} "
                       f"({len(result['segments_info'])} segments)")
    if failed:
        click.echo(f"{len(failed)} of {len(images)} images failed: {printable(', '.join(failed))}", err=True)
        sys.exit(1)


def job_options(func):
    """Options of submit and run, besides the model options."""
    options = [
        click.argument("source"),
        click.option("--dest", required=True, help="s3://bucket/prefix or a folder, outside SOURCE."),
        click.option("--chunk-size", type=click.IntRange(min=1), default=DEFAULT_CHUNK_SIZE, show_default=True,
                     help="Images per queued task."),
        click.option("--include", "includes", multiple=True, metavar="PATTERN",
                     help="Only keys matching this glob (relative to SOURCE); repeatable."),
        click.option("--name", help="A name for the job (default: SOURCE)."),
        click.option("--force", is_flag=True, help="Process every image, also those unchanged (same ETag) "
                     "since their last success with the same model settings."),
        click.option("--overlays", is_flag=True, help="Also write DEST/<path>.overlay.jpg: the image with its "
                     "segments coloured and labelled (at most 2048 px; see `report`)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def job_spec(source, dest, chunk_size, includes, name, options, queue=None) -> "JobSpec":
    """The job the options describe; a --categories file that cannot be used is refused here,
    before anything else is touched."""
    from worker.labels import LabelMap

    from .submit import JobSpec
    label_map = LabelMap.load(options["categories"]) if options.get("categories") else None
    return JobSpec(source=source, dest=dest, model=options["model"], weights=options["weights"],
                   threshold=options["threshold"], min_size=options["min_size"], max_size=options["max_size"],
                   name=name, includes=tuple(includes), chunk_size=chunk_size, label_map=label_map,
                   config={"batch_size": options["batch_size"], "max_pixels": options["max_pixels"],
                           "max_bytes": options["max_bytes"], "chunk_size": chunk_size, "queue": queue,
                           "overlays": bool(options.get("overlays"))})


def skipped_note(status) -> str:
    skipped = status.config.get("skipped", 0)
    return f"; {skipped} unchanged images skipped (--force reprocesses them)" if skipped else ""


_CHECK_DEVICE = """
import sys
from worker.predictor import check_device
try:
    check_device(sys.argv[1], sys.argv[2])
except ValueError as exc:
    print(exc)
    sys.exit(3)
"""


def check_worker_settings(device: str, precision: str, before_fork: bool = False) -> None:
    """Refuse a device or precision this machine cannot run before any job is touched.

    `before_fork`: this process forks the processes that will use the GPU (Celery's pool), so it
    must not touch CUDA itself — a CUDA runtime initialised before a fork is unusable in the
    children — and a device other than the CPU is checked in a short-lived process instead."""
    from storage.retry import retry_budget
    try:
        retry_budget()              # a bad $PANOPTIC_RETRY_SECONDS: said once, not by every image
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    if before_fork and device != "cpu":
        import subprocess
        result = subprocess.run([sys.executable, "-c", _CHECK_DEVICE, device, precision],
                                capture_output=True, text=True, timeout=300)
        if result.returncode == 3:
            raise CommandError(result.stdout.strip(), EXIT_USAGE)
        if result.returncode != 0:
            raise click.ClickException(f"cannot check --device {device}: {result.stderr.strip()[-2000:]}")
        return
    from worker.predictor import check_device
    try:
        check_device(device, precision)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc


def check_broker(dispatcher) -> None:
    """Refuse in seconds when the broker is down or refuses us (sending would retry for ~50 s)."""
    try:
        dispatcher.check_connection()
    except Exception as exc:
        raise broker_error(exc) from exc


def _log_warnings_escaped() -> None:
    """`run` logs each failed image (key, error) on stderr: through the text formatter, which
    escapes control characters, rather than Python's bare fallback handler."""
    import logging

    from worker.logs import make_handler
    root = logging.getLogger()
    if not root.handlers:
        handler = make_handler("text")
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)


@main.command()
@job_options
@click.option("--queue", default=None, help="Broker queue for this job's tasks (default: panoptic); "
              "e.g. separate queues for nightly and ad-hoc jobs.")
@model_options
def submit(source, dest, chunk_size, includes, name, force, queue, **options):
    """Walk SOURCE, record a job, queue its images for workers. Prints the job id last."""
    from dataclasses import replace

    from .dispatch import Dispatcher
    from .submit import submit as submit_job

    spec = job_spec(source, dest, chunk_size, includes, name, options, queue=queue)
    store = open_store()
    dispatcher = Dispatcher(store)
    spec = replace(spec, config={**spec.config, "broker": dispatcher.broker})     # its reapers' jobs

    def before_recording(_label_map):     # after the weights and label map were checked (submit)
        check_broker(dispatcher)

    with dispatcher.app.producer_or_acquire():
        job_id = submit_job(store, spec, lambda job, ids: dispatcher.enqueue(job, ids, queue), force=force,
                            before_recording=before_recording)
    status = store.job(job_id)
    click.echo(f"job {job_id}: {status.total} images in {dispatcher.sent} chunks queued on "
               f"{printable(mask_url(broker_url()))}{skipped_note(status)}")
    click.echo(job_id)


@main.command()
@job_options
@model_options
def run(source, dest, chunk_size, includes, name, force, **options):
    """Submit and process SOURCE in this process: no broker, no servers (SQLite by default).

    Exits 0 when every image succeeded, 1 when some failed (and lists them). Ctrl-C (SIGINT) or
    SIGTERM stops it after the current batch (a second one at once): the unfinished images are
    given back, the job is marked interrupted, and the same command resumes it (a `run` killed
    outright too, once its process is gone)."""
    from .embedded import StopOnSignals, embedded_spec, take_back_a_killed_run
    from .submit import chunked, submit as submit_job

    _log_warnings_escaped()
    spec = embedded_spec(job_spec(source, dest, chunk_size, includes, name, options), force)
    store = open_store()
    chunks: list[tuple[str, list[int]]] = []
    processor = None
    with StopOnSignals() as stopping:

        def load_model(label_map):    # before recording, after the cheaper checks: weights that cannot load refuse
            nonlocal processor
            from types import SimpleNamespace

            from worker.heap import keep_freed_memory
            from worker.labels import LabelMapError
            from worker.pipeline import ChunkProcessor, DeviceFailure
            check_worker_settings(options["device"], options["precision"])
            keep_freed_memory()
            processor = ChunkProcessor(store, device=options["device"], precision=options["precision"],
                                       stop=stopping.event)
            try:
                processor.predictor_for(SimpleNamespace(model=spec.model, weights=spec.weights,
                                                        threshold=spec.threshold, min_size=spec.min_size,
                                                        max_size=spec.max_size, config=spec.config), label_map)
            except DeviceFailure as exc:
                raise click.ClickException(f"device failure: {exc}") from exc
            except LabelMapError as exc:  # a head whose size the weights' file did not tell submit
                raise CommandError(str(exc), EXIT_LABEL_MAP) from exc
            except ValueError as exc:     # settings the model refuses
                raise CommandError(str(exc), EXIT_USAGE) from exc

        killed = take_back_a_killed_run(store, spec.config["run_key"])
        if killed:
            click.echo(f"job {killed}: the `run` processing it stopped without giving its images back (killed?)")
        resumed = store.find_interrupted(spec.config["run_key"])
        try:
            if resumed:
                from worker.labels import job_label_map
                from worker.weights_source import describe_weights
                describe_weights(spec.weights, spec.model)          # fast (no torch): a missing file, offline
                load_model(job_label_map(store, store.job(resumed)))
                job_id = resumed
                chunks = [(job_id, ids) for ids in chunked(store.resume(job_id), chunk_size)]
                click.echo(f"resuming interrupted job {job_id}: {sum(len(ids) for _, ids in chunks)} images left")
            else:
                job_id = submit_job(store, spec, lambda job, ids: chunks.append((job, ids)), force=force,
                                    before_recording=load_model)
        except KeyboardInterrupt:
            raise click.ClickException("interrupted while listing SOURCE: nothing was processed") from None
        from .progress import JobProgress, stdout_console
        try:
            with JobProgress(job_id, store.job(job_id).total, stdout_console()) as progress:
                for job, ids in chunks:
                    if stopping.requested:
                        break
                    processor.process(job, ids)
                    now = store.job(job_id)
                    progress.update(now.succeeded + now.failed, now.failed)
        except KeyboardInterrupt:
            pass                        # the second signal: the chunk gave its claims back already
        except Exception as exc:   # a model that cannot load (weights, device): say why, not a traceback
            if type(exc).__name__ in ("WeightsError", "ValueError"):
                raise click.ClickException(str(exc)) from exc
            if type(exc).__name__ == "DeviceFailure":
                raise click.ClickException(f"device failure: {exc}; the job's unfinished images are pending again: "
                                           "run again once the device works (done images are skipped)") from exc
            raise
        stopping.settle()
        if stopping.requested and store.interrupt(job_id):
            status = store.job(job_id)
            click.echo(f"job {job_id}: interrupted, {status.succeeded + status.failed} of {status.total} done, "
                       f"{status.pending} left: run the same command again to resume it", err=True)
            click.echo(job_id)
            sys.exit(stopping.exit_code)
    status = store.job(job_id)
    click.echo(f"job {job_id}: {status.state}, {status.succeeded} of {status.total} succeeded, "
               f"{status.failed} failed{skipped_note(status)}")
    for image in store.images(job_id, state="failed") if status.failed else ():
        click.echo(f"  failed: {printable(image.key)}: {printable(image.error)}", err=True)
    click.echo(job_id)                  # the last line, as submit's, whatever the outcome
    if status.failed:
        sys.exit(1)


@main.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (one worker per GPU).")
@click.option("--precision", type=click.Choice(sorted(PRECISIONS)), default="fp32", show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes. Keep 1 per GPU: each process loads its own model.")
@click.option("--queues", default=None, help="Comma-separated queues to consume (default: panoptic).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="PANOPTIC_LOG_FORMAT", show_envvar=True, help="json: one JSON object per line "
              "(timestamp, level, logger, message, job_id, chunk, image ids…), for log collectors.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, envvar="PANOPTIC_METRICS_PORT",
              show_envvar=True, help="Serve Prometheus metrics at http://0.0.0.0:PORT/metrics (bind address: "
              "$PANOPTIC_METRICS_ADDR); off by default.")
def worker(device, precision, concurrency, queues, loglevel, log_format, metrics_port):
    """Start a Celery worker that processes queued chunks (broker: $PANOPTIC_BROKER_URL)."""
    import os

    from worker.logs import configure as configure_logging
    from worker.queue import DEFAULT_QUEUE, MAIN_PID_ENV, app

    from .dispatch import start_reaper_thread

    check_worker_settings(device, precision, before_fork=True)
    refuse_a_newer_database_schema()
    os.environ["PANOPTIC_DEVICE"] = device
    os.environ["PANOPTIC_PRECISION"] = precision
    os.environ[MAIN_PID_ENV] = str(os.getpid())         # a pool process whose device fails stops us
    configure_logging(log_format, loglevel)
    if metrics_port is not None:
        from worker.metrics_server import serve as serve_metrics
        try:
            serve_metrics(metrics_port)
        except OSError as exc:
            raise click.ClickException(f"--metrics-port {metrics_port}: {exc.strerror or exc}") from exc
    start_reaper_thread()
    # --quiet (Celery's): no start-up banner on stdout, which would break a stream of JSON lines.
    quiet = ["--quiet"] if log_format == "json" else []
    app.worker_main([*quiet, "worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", "--pool=prefork",
                     f"--queues={queues or DEFAULT_QUEUE}", "--without-gossip", "--without-mingle"])


@main.command()
@click.argument("job_id")
def cancel(job_id):
    """Cancel a job: queued chunks are dropped, running ones stop before their next image."""
    store = open_store()
    job = find_job(store, job_id)
    if store.cancel(job.id):
        click.echo(f"job {job.id} cancelled")
    else:
        click.echo(f"job {job.id} is already {job.state}; nothing to cancel")


@main.command()
@click.argument("job_id")
def retry(job_id):
    """Queue a job's failed images again (only those; images whose outputs would overwrite
    another image's stay failed). A cancelled or interrupted job is reopened: its pending images
    are queued again too (a job of `run`: run the same command again to process them)."""
    from .dispatch import Dispatcher, requeue
    from .embedded import EMBEDDED_BROKER
    from .submit import OUTPUT_CONFLICT

    store = open_store()
    job = find_job(store, job_id)
    embedded = job.config.get("broker") == EMBEDDED_BROKER
    dispatcher = None if embedded else Dispatcher(store)
    if dispatcher is not None and job.config.get("broker") not in (None, dispatcher.broker):
        from worker.text import printable
        raise click.ClickException(f"job {job.id} was submitted through the broker {printable(job.config['broker'])}, "
                                   f"not {printable(dispatcher.broker)}: retry it with that PANOPTIC_BROKER_URL")
    if dispatcher is not None:
        check_broker(dispatcher)      # before the failed images become pending with nobody to queue them
    ids = store.reset_failed(job.id, unless_error_starts=OUTPUT_CONFLICT,
                             reopen_as="interrupted" if embedded else "running")
    if dispatcher is not None:
        requeue(store, dispatcher, job.id, ids)
    left = sum(1 for image in store.images(job.id, state="failed") if (image.error or "").startswith(OUTPUT_CONFLICT))
    reopened = job.state in ("cancelled", "interrupted")
    what = "failed and pending images" if reopened else "failed images"
    click.echo(f"job {job.id}: {len(ids)} {what} "
               + ("pending again: run the same `panoptic-batch run` command to process them"
                  if embedded and (ids or reopened) else "queued again")
               + (f"; {left} left failed: their outputs would overwrite another image's" if left else ""))


@main.command()
def reap():
    """Queue again the images whose worker was lost (lease expired), and pending images whose
    messages were lost (their queue is empty; see $PANOPTIC_STALE_PENDING_SECONDS). Workers do this
    themselves every $PANOPTIC_REAP_INTERVAL seconds; this runs one pass now (e.g. from cron)."""
    from .dispatch import Dispatcher, reap as reap_once
    store = open_store()
    dispatcher = Dispatcher(store)
    check_broker(dispatcher)          # before expired claims are released with nobody to queue them
    click.echo(f"{reap_once(store, dispatcher)} images re-queued")


def status_dict(status) -> dict:
    return {"id": status.id, "name": status.name, "state": status.state, "total": status.total,
            "succeeded": status.succeeded, "failed": status.failed, "pending": status.pending,
            "running": status.running, "skipped": status.config.get("skipped", 0),
            "rate": round(status.rate, 3), "source": status.source,
            "dest": status.dest, "model": status.model, "weights": status.weights,
            "weights_sha256": status.weights_sha256, "threshold": status.threshold,
            "label_map_sha256": status.label_map_sha256,
            "created_at": _iso(status.created_at), "started_at": _iso(status.started_at),
            "finished_at": _iso(status.finished_at)}


def _iso(moment):
    return moment.isoformat() if moment else None


@main.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True,
              help="Redraw a live progress bar (images/s, ETA) until JOB_ID finishes; plain lines when "
                   "stdout is not a terminal.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between polls with --watch.")
@click.option("--failed", "list_failed", is_flag=True,
              help="List JOB_ID's failed images and why, one 'KEY: ERROR' line each (--json: a list of "
                   '{"key", "uri", "attempts", "error"}).')
def status(job_id, as_json, watch, interval, list_failed):
    """Progress of JOB_ID, or of every job."""
    store = open_store()
    if watch:
        if not job_id or as_json or list_failed:
            raise click.UsageError("--watch needs a JOB_ID and does not combine with --json or --failed")
        _watch(store, find_job(store, job_id).id, interval)
        return
    if list_failed:
        if not job_id:
            raise click.UsageError("--failed needs a JOB_ID")
        failed = store.images(find_job(store, job_id).id, state="failed")
        if as_json:
            click.echo(json.dumps([{"key": i.key, "uri": i.uri, "attempts": i.attempts, "error": i.error}
                                   for i in failed], indent=1))
        else:
            for image in failed:
                click.echo(f"{printable(image.key)}: {printable(image.error)}")
        return
    statuses = [find_job(store, job_id)] if job_id else store.jobs()
    if as_json:
        payload = [status_dict(s) for s in statuses]
        click.echo(json.dumps(payload[0] if job_id else payload, indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    # Ids and states whole at any width (they are copied into the next command); names give way.
    table = Table(box=None, pad_edge=False)
    table.add_column("job", no_wrap=True, min_width=12)
    table.add_column("name", overflow="ellipsis", min_width=4)
    table.add_column("state", no_wrap=True, min_width=9)
    for header in ("total", "succeeded", "failed", "pending", "images/s"):
        table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    for s in statuses:
        table.add_row(s.id, cell(s.name), s.state, str(s.total), str(s.succeeded), str(s.failed), str(s.pending),
                      f"{s.rate:.2f}")
    Console().print(table)


def _watch(store, job_id: str, interval: float) -> None:
    from .progress import JobProgress, stdout_console
    job = store.job(job_id)
    try:
        with JobProgress(job_id, job.total, stdout_console()) as progress:
            while True:
                progress.update(job.succeeded + job.failed, job.failed, total=job.total)
                if job.finished or job.state == "interrupted":       # nothing runs it until resumed
                    break
                time.sleep(interval)
                job = store.job(job_id)
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(f"job {job.id}: {job.state}, {job.succeeded} of {job.total} succeeded, {job.failed} failed"
               f"{skipped_note(job)}")


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(job_id, as_json):
    """Per-class statistics of a job's succeeded images: segments, images, pixels."""
    from .report import class_rows

    store = open_store()
    job = find_job(store, job_id)
    fields = ("category_id", "category_name", "isthing", "segments", "images", "pixels")
    rows = [{name: row[name] for name in fields} for row in class_rows(store, job.id)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("id", "category", "thing", "segments", "images", "pixels", title=f"job {job.id}")
    for r in rows:
        table.add_row(str(r["category_id"]), cell(r["category_name"]), "yes" if r["isthing"] else "no",
                      str(r["segments"]), str(r["images"]), str(r["pixels"]))
    Console().print(table)


from .evaluate import evaluate_command  # noqa: E402  (export and evaluate: using the results)
from .export import export_command  # noqa: E402

main.add_command(export_command, "export")
main.add_command(evaluate_command, "evaluate")

from .report import report_command  # noqa: E402  (report: a static HTML report of a job)

main.add_command(report_command, "report")

from .prune import prune_command  # noqa: E402  (prune: old finished jobs out of the database)

main.add_command(prune_command, "prune")


if __name__ == "__main__":
    main()
