"""The web page (`python -m web`): the same queue and workers as the bot, through `imagine/`; no torch."""
