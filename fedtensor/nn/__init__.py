"""Learned restoration of decoded volumes: a Flax NNX 3D auto-encoder trained on the codec's own output.

Library entry points (heavy imports happen here, so import this package lazily from CLIs)::

    from fedtensor.nn import train, TrainConfig, load_model, model_id, restore, decompress_restored

    summary = train(["a.nii.gz", "b.nii.gz"], "models/ct", TrainConfig(epochs=20))
    model = load_model("models/ct")                     # verified against its SHA-256 id
    vol = decompress_restored(open("x.ftz", "rb").read(), model)   # warns if the stream names another model
    vol = restore(decoded_volume, read_info(data), model)          # same, from a decoded Volume + header

Modules: :mod:`.model` (the net), :mod:`.normalize` (intensities, conditioning), :mod:`.data` (codec
pairs, cache, split, patches), :mod:`.train` (optax loop, checkpoints, history), :mod:`.infer` (tiled
inference, restore, evaluate, rate search), :mod:`.adapt` (the output layer the encoder fits to a
stream), :mod:`.checkpoint` (model directories, ids, errors).
"""

from fedtensor.nn.checkpoint import ModelError, model_id
from fedtensor.nn.infer import (
    ModelMismatchWarning,
    RestorationModel,
    compress_for_quality,
    decompress_restored,
    evaluate,
    load_model,
    model_mismatch,
    restore,
    restore_array,
    restore_stream,
    tag_stream,
)
from fedtensor.nn.model import NetConfig, RestorationNet, new_net
from fedtensor.nn.train import TrainConfig, save_model, train

__all__ = [
    "ModelError", "ModelMismatchWarning", "NetConfig", "RestorationModel", "RestorationNet", "TrainConfig",
    "compress_for_quality", "decompress_restored", "evaluate", "load_model", "model_id", "model_mismatch",
    "new_net", "restore", "restore_array", "restore_stream", "save_model", "tag_stream", "train",
]
