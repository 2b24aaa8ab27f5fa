"""The LoRA trainer (`python -m trainer train`): fine-tunes SD v1-4's UNet attention projections on
Flickr30k captions and publishes the adapter into LORA_DIR for the workers to hot-reload.

`data.py` reads the data, `cache.py` keeps what the frozen encoders compute, `train.py` is the
training script. Still to come (see its issue): validation grids, TensorBoard, `python -m trainer eval`.
"""
