"""One cog per concern: `/imagine` (imagine.py), a job's life in Discord and its buttons (jobs.py), and
the admin commands (admin.py)."""
