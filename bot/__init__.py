"""The Discord bot: `python -m bot`. It imports no torch: jobs go to the workers through `imagine`."""
