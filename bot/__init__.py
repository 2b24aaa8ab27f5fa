"""The Discord bot (`python -m bot`): `/imagine` and the admin commands, over the image service's client.

`app.py` is the bot class; `cogs/` holds one cog per concern (`imagine.py` the command, `jobs.py` a job's
life in Discord: submit, follow, deliver, the buttons' clicks; `admin.py` the admin commands);
`buttons.py` the buttons under a job's message, `checks.py` who is an admin, `messages.py` what the bot
shows, `deliveries.py` and `limits.py` what it keeps in Redis through the client. It imports no torch:
it talks to the workers through `imagine/` only.
"""
