"""The LoRA trainer (`python -m trainer`): fine-tunes SD v1-4's UNet attention on Flickr30k captions.

Built so far: reading the data (`trainer/data.py`). The training loop, caching, checkpoints, export
and evaluation are the rest of its issue.
"""
