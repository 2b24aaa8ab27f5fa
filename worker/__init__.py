"""The GPU worker: `celery -A worker worker` loads the pipeline once and serves jobs.

Celery finds the application in `worker.celery`; importing this package alone loads nothing.
"""
