"""worker: turns images into panoptic results (DETR model, pre- and postprocessing, Celery task)."""
