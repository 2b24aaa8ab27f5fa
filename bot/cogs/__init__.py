"""One cog per concern: `/imagine` and the job buttons, and the admin commands."""
