"""The LoRA trainer (`python -m trainer train|eval`): fine-tunes a LoRA (or DoRA) on SD v1-4's UNet (its
attention projections by default) on Flickr30k captions and publishes the adapter into LORA_DIR for the
workers to hot-reload.

`data.py` reads the data, `batches.py` plans what every step trains on (aspect-ratio buckets included) and
prepares it in DataLoader workers, `cache.py` keeps what the frozen encoders compute, `train.py` is the
training script, `validation.py` draws the base-versus-adapter grids, `publish.py` writes the adapter into LORA_DIR
and tells the workers, and `evaluate.py` scores an adapter with CLIP on held-out captions.
"""
