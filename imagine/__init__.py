"""What every process shares, and the front ends' way in. Imports no torch.

`contract.py` types what goes in (a job's options, their ranges and defaults); `wire.py` types what comes
back through Redis (events, result metadata, worker statuses, reload answers, refused messages);
`store.py` keeps them in Redis, each state change one Lua script; `queue.py` is the Celery application
and what a job's message looks like; `client.py` is the one client of every front end; `cli.py` and
`admin.py` are the `imagine` and `imagine-admin` commands; `metrics.py` the Prometheus exporter.
"""
