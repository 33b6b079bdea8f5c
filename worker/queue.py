"""The Celery application: broker settings and the chunk task.

Settings follow what at-least-once delivery on Redis needs (see CONTRACTS.md, "Facts learned the
hard way"): JSON only, late acks, one message prefetched per process, tasks re-queued when a
worker is lost, and a visibility timeout well above the longest chunk. Exactly-once effects come
from the database claims in `worker.pipeline`, not from Celery.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import NoReturn

from celery import Celery
from celery.signals import worker_process_init

from .heap import keep_freed_memory

BROKER_ENV = "PANOPTIC_BROKER_URL"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
TASK_NAME = "panoptic_batch.process_chunk"
DEFAULT_QUEUE = "panoptic"
# A chunk of a few dozen images takes minutes on a GPU; redelivery waits this long (Redis).
VISIBILITY_TIMEOUT_S = 4 * 3600
# A chunk that runs past these is stopped (soft: finishes cleanly; hard: the process is killed).
SOFT_TIME_LIMIT_S = 3 * 3600
TIME_LIMIT_S = SOFT_TIME_LIMIT_S + 300
# Exit status of a pool process that stops on a device failure (EX_SOFTWARE).
EXIT_DEVICE_FAILURE = 70
# Set by `panoptic-batch worker`: the pid of Celery's main process, which a device failure stops.
MAIN_PID_ENV = "PANOPTIC_WORKER_MAIN_PID"


def broker_url() -> str:
    return os.environ.get(BROKER_ENV, DEFAULT_BROKER_URL)


def make_app() -> Celery:
    app = Celery("panoptic_batch", broker=broker_url())
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        task_soft_time_limit=SOFT_TIME_LIMIT_S,
        task_time_limit=TIME_LIMIT_S,
        # socket_timeout: a broker that vanishes without closing the TCP connection (failover, NAT)
        # is noticed instead of waited on forever.
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S,
                                  "socket_timeout": 30, "socket_connect_timeout": 10},
        broker_connection_retry_on_startup=True,
        # A broker restart never stops a worker: it reconnects, however long the broker is away.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # A chunk keeps running when the broker connection drops: its results go to S3 and SQL,
        # and if its message comes back it finds the work done (Celery 6 will default to True).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


app = make_app()
_processor = None


@worker_process_init.connect
def _start_pool_process(**_):
    """A forked pool process loads its own model (never one from a parent before a fork), with
    freed memory kept in its heap (worker.heap)."""
    global _processor
    _processor = None
    keep_freed_memory()


def processor():
    """This process's ChunkProcessor, created on first use (the model loads on the first chunk)."""
    global _processor
    if _processor is None:
        from storage.jobs import JobStore
        from .pipeline import ChunkProcessor
        _processor = ChunkProcessor(JobStore(), device=os.environ.get("PANOPTIC_DEVICE", "auto"),
                                    precision=os.environ.get("PANOPTIC_PRECISION", "fp32"))
    return _processor


@app.task(name=TASK_NAME)
def process_chunk(job_id: str, image_ids: list[int], database: str | None = None) -> dict:
    from .metrics import track_chunk      # log context (job, chunk, images), chunk metrics and log line
    from .pipeline import DeviceFailure
    if database is not None and database != processor().store.database_id():
        _leave_for_its_deployment(job_id, database)
    try:
        with track_chunk(job_id, image_ids, process_chunk.request.id) as chunk:
            outcomes = chunk.outcomes = processor().process(job_id, image_ids)
    except DeviceFailure as exc:
        _stop_worker(exc)
    return {"succeeded": sum(o.ok for o in outcomes), "failed": sum(not o.ok and not o.refused for o in outcomes),
            "refused": sum(o.refused for o in outcomes)}


# A message of another deployment is held this long before it goes back to the queue, so that
# two deployments sharing a queue do not pass it back and forth in a busy loop.
FOREIGN_MESSAGE_PAUSE_S = 2.0
_foreign_jobs_logged: set[str] = set()


def _leave_for_its_deployment(job_id: str, database: str) -> NoReturn:
    """The chunk's job is in another database: another deployment shares this broker and queue.
    Put the message back for one of its workers (never process it here, nor drop it)."""
    from celery.exceptions import Reject

    from .text import printable
    if job_id not in _foreign_jobs_logged:        # once per job and process: it comes back often
        _foreign_jobs_logged.add(job_id)
        logging.getLogger(__name__).warning(
            "chunk of job %s left on the broker: it belongs to another deployment's database (%s), "
            "which shares this broker and queue; give each deployment its own broker database or "
            "virtual host (README: Isolating deployments)", printable(job_id), printable(database))
    time.sleep(FOREIGN_MESSAGE_PAUSE_S)
    raise Reject("job of another deployment's database", requeue=True)


def _stop_worker(failure: Exception) -> NoReturn:
    """A device that fails for good would fail every image this worker takes: stop the whole
    worker (a warm shutdown of Celery's main process; a supervisor or Docker's restart policy
    starts it again, and its start-up check refuses a device that is gone) and end this pool
    process at once, so that the chunk's message goes back to the queue (late acks, rejected on a
    lost worker) for a healthy worker. The chunk's unfinished images are pending again already."""
    logging.getLogger(__name__).critical("device failure, stopping this worker: %s", failure)
    for handler in logging.getLogger().handlers:
        handler.flush()
    main_pid = int(os.environ.get(MAIN_PID_ENV) or 0)
    if main_pid and main_pid != os.getpid():
        os.kill(main_pid, signal.SIGTERM)
    os._exit(EXIT_DEVICE_FAILURE)
