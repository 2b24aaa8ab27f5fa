"""The GPU worker: `celery -A worker worker` loads the pipeline once and serves jobs.

Celery finds the application in `worker.celery`; importing this package alone loads nothing.
`service.py` puts one worker process together from its parts: `jobs.py` (a job's life, from its message to
its outcome, and where a failure's reason is decided), `reloads.py` (hot reload of adapters),
`liveness.py` (status, heartbeats, recovering what other workers left), `attempt.py` (the attempt in
hand, shared by the two threads), over `pipeline.py` (loading the model), `adapters.py` (LoRA files)
and `renderer.py` (one render). `transport.py` screens the queue's messages; `tasks.py` is the thin
Celery task.
"""
