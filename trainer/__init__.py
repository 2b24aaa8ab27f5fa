"""The LoRA trainer (`python -m trainer train`): fine-tunes SD v1-4's UNet attention projections on
Flickr30k captions and publishes the adapter into LORA_DIR for the workers to hot-reload.

`data.py` reads the data; `train.py` is the training script. Still to come (see its issue): the
latent and text-embedding cache, validation grids, TensorBoard, and `python -m trainer eval`.
"""
