"""Hand chunks of image ids to the broker, and re-queue what workers lost (the reaper).

The reaper exists because a killed worker's message comes back from Redis only after the
broker's visibility timeout (hours; see CONTRACTS.md). Images whose lease expired go back to
pending and are queued again at once; the late redelivery of the old message is harmless, since
claims in SQL decide who processes what. Attempts are counted in SQL, so an image that kills
every worker that takes it is failed after a few tries instead of circulating forever.

It also re-queues pending images whose messages are gone: a Redis restarted without persistence
forgets its queues; a worker killed after receiving a chunk but before claiming its images leaves
them pending while the message waits, unacknowledged, for the visibility timeout; a release whose
re-queue failed (broker down) leaves pending images nobody will deliver. Those are recognised
conservatively — their job's queue is empty, yet they
stayed pending and untouched for PANOPTIC_STALE_PENDING_SECONDS — and a duplicate message for an
image that still had one costs only a claim that finds nothing to do.
"""

from __future__ import annotations

import logging
import os
import threading

from storage.jobs import JobStore

from .submit import DEFAULT_CHUNK_SIZE, chunked

log = logging.getLogger(__name__)

DEFAULT_REAP_INTERVAL_S = 60.0
# Pending images of an active job whose queue is empty are queued again after this long untouched.
DEFAULT_STALE_PENDING_S = 300.0


def reap_interval() -> float:
    return float(os.environ.get("PANOPTIC_REAP_INTERVAL", DEFAULT_REAP_INTERVAL_S))


def stale_pending_seconds() -> float:
    return float(os.environ.get("PANOPTIC_STALE_PENDING_SECONDS", DEFAULT_STALE_PENDING_S))


class Dispatcher:
    """Sends chunk tasks by name, so the scheduler never imports the model code.

    Each message carries the identity of the database its job is in (``store``'s, when given, or
    the ``database`` passed to :meth:`enqueue`): a worker connected to another database leaves it
    on the broker for a worker of its own deployment. ``broker`` is the broker's masked URL, as
    recorded with the jobs submitted through it."""

    def __init__(self, store: JobStore | None = None):
        from storage.objects import mask_url
        from worker.queue import DEFAULT_QUEUE, TASK_NAME, app
        self.app, self.task_name, self.default_queue = app, TASK_NAME, DEFAULT_QUEUE
        self.broker = mask_url(str(app.conf.broker_url))
        self.store = store
        self.sent = 0

    def enqueue(self, job_id: str, image_ids: list[int], queue: str | None = None, database: str | None = None) -> None:
        if database is None and self.store is not None:
            database = self.store.database_id()
        self.app.send_task(self.task_name, args=[job_id, list(image_ids)],
                           kwargs={} if database is None else {"database": database},
                           queue=queue or self.default_queue,
                           retry=True, retry_policy={"max_retries": 10, "interval_start": 0.5,
                                                     "interval_step": 1.0, "interval_max": 10.0})
        self.sent += 1

    def check_connection(self, timeout: float = 5.0) -> None:
        """Connect to the broker once (a second try after a short pause), raising its error, so a
        command refuses in seconds before it records anything: sending retries for ~50 s, which
        is right for a broker restarting mid-job and wrong for one that is down or misconfigured."""
        # Short socket timeouts too: a broker that accepts and never answers is waited on 30 s otherwise.
        with self.app.connection_for_write(connect_timeout=timeout, transport_options={
                "socket_timeout": timeout, "socket_connect_timeout": timeout}) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0.5, interval_step=0.5, interval_max=1.0,
                                         timeout=timeout)

    def queued(self, queue: str | None = None) -> int | None:
        """Messages waiting in ``queue`` (not those workers hold); None when the broker cannot say."""
        name = queue or self.default_queue
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=2)
                return int(connection.default_channel.queue_declare(queue=name, passive=True).message_count)
        except Exception as exc:
            if str(getattr(exc, "reply_code", "")) == "404" or "NOT_FOUND" in str(exc):
                return 0      # Redis drops an empty list; RabbitMQ: nothing ever declared it
            log.warning("cannot count the messages in queue %s: %s", name, exc)
            return None


def requeue(store: JobStore, dispatcher: Dispatcher, job_id: str, image_ids: list[int]) -> int:
    """Queue `image_ids` of a job again, in the job's chunk size and on its queue."""
    job = store.job(job_id)
    database = store.database_id()
    for chunk in chunked(image_ids, job.config.get("chunk_size", DEFAULT_CHUNK_SIZE)):
        dispatcher.enqueue(job.id, chunk, job.config.get("queue"), database=database)
    return len(image_ids)


def reap(store: JobStore, dispatcher: Dispatcher) -> int:
    """Re-queue every running image whose lease has expired, and the pending images whose
    messages were lost (see :func:`requeue_lost`); returns how many. Only jobs submitted through
    this dispatcher's broker (or older jobs that recorded none) are touched: another deployment
    sharing the database re-queues its own, and a job of `run` is resumed by its `run`."""
    released = store.release_expired(broker=dispatcher.broker)
    total = sum(requeue(store, dispatcher, job_id, ids) for job_id, ids in released.items())
    if total:
        log.warning("re-queued %d images whose worker was lost (lease expired)", total)
    return total + requeue_lost(store, dispatcher)


def requeue_lost(store: JobStore, dispatcher: Dispatcher, stale_after: float | None = None) -> int:
    """Queue again the pending images of active jobs whose queue is empty and that have stayed
    untouched for ``stale_after`` seconds (default $PANOPTIC_STALE_PENDING_SECONDS); returns how many."""
    stale_after = stale_pending_seconds() if stale_after is None else stale_after
    empty: dict[str, bool] = {}
    total = 0
    for job_id, config in store.active_jobs(broker=dispatcher.broker):
        queue = config.get("queue") or dispatcher.default_queue
        if queue not in empty:
            empty[queue] = dispatcher.queued(queue) == 0
        if not empty[queue]:
            continue                          # messages are waiting: the images are not lost
        ids = store.touch_stale_pending(job_id, stale_after)
        if ids:
            total += requeue(store, dispatcher, job_id, ids)
            log.warning("re-queued %d pending images of job %s: queue %s is empty, so their messages "
                        "were lost (a broker restarted without persistence, or a worker lost before it "
                        "claimed them)", len(ids), job_id, queue)
    return total


def start_reaper_thread(interval: float | None = None) -> threading.Event:
    """Reap every `interval` seconds in a daemon thread (each worker runs one); set the event to stop."""
    stop = threading.Event()
    period = interval or reap_interval()

    def loop():
        store, dispatcher = JobStore(), Dispatcher()
        while not stop.wait(period):
            try:
                reap(store, dispatcher)
            except Exception:                 # the database or broker is away: try next time
                log.exception("reaper pass failed")

    threading.Thread(target=loop, name="reaper", daemon=True).start()
    return stop
