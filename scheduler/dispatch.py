"""Hand chunks of image ids to the broker, and re-queue what workers lost (the reaper).

The reaper exists because a killed worker's message comes back from Redis only after the
broker's visibility timeout (hours; see CONTRACTS.md). Images whose lease expired go back to
pending and are queued again at once; the late redelivery of the old message is harmless, since
claims in SQL decide who processes what. Attempts are counted in SQL, so an image that kills
every worker that takes it is failed after a few tries instead of circulating forever.
"""

from __future__ import annotations

import logging
import os
import threading

from storage.jobs import JobStore

from .submit import DEFAULT_CHUNK_SIZE, chunked

log = logging.getLogger(__name__)

DEFAULT_REAP_INTERVAL_S = 60.0


def reap_interval() -> float:
    return float(os.environ.get("PANOPTIC_REAP_INTERVAL", DEFAULT_REAP_INTERVAL_S))


class Dispatcher:
    """Sends chunk tasks by name, so the scheduler never imports the model code."""

    def __init__(self):
        from worker.queue import DEFAULT_QUEUE, TASK_NAME, app
        self.app, self.task_name, self.default_queue = app, TASK_NAME, DEFAULT_QUEUE
        self.sent = 0

    def enqueue(self, job_id: str, image_ids: list[int], queue: str | None = None) -> None:
        self.app.send_task(self.task_name, args=[job_id, list(image_ids)], queue=queue or self.default_queue,
                           retry=True, retry_policy={"max_retries": 10, "interval_start": 0.5,
                                                     "interval_step": 1.0, "interval_max": 10.0})
        self.sent += 1


def requeue(store: JobStore, dispatcher: Dispatcher, job_id: str, image_ids: list[int]) -> int:
    """Queue `image_ids` of a job again, in the job's chunk size and on its queue."""
    job = store.job(job_id)
    for chunk in chunked(image_ids, job.config.get("chunk_size", DEFAULT_CHUNK_SIZE)):
        dispatcher.enqueue(job.id, chunk, job.config.get("queue"))
    return len(image_ids)


def reap(store: JobStore, dispatcher: Dispatcher) -> int:
    """Re-queue every running image whose lease has expired; returns how many."""
    released = store.release_expired()
    total = sum(requeue(store, dispatcher, job_id, ids) for job_id, ids in released.items())
    if total:
        log.warning("re-queued %d images whose worker was lost (lease expired)", total)
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
