import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from frugal_qat.errors import CorruptCheckpoint
from frugal_qat.offload.weights import WeightStore


def test_reads_sharded_checkpoint_lazily(tiny_llama):
    store = WeightStore(tiny_llama)
    assert len(store.headers) > 1, "the fixture must be sharded"
    state = store.block_state(1)
    assert state["self_attn.q_proj.weight"].shape == (64, 64)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert store.nbytes_of_block(1) > 0


def test_fingerprint_changes_with_weights(tiny_llama):
    before = WeightStore(tiny_llama).fingerprint()
    shard = sorted(tiny_llama.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    k = next(iter(tensors))
    tensors[k] = torch.cat([tensors[k], tensors[k]])  # a change of shape changes the header
    save_file(tensors, shard, metadata={"format": "pt"})
    assert WeightStore(tiny_llama).fingerprint() != before


def test_missing_shard(tiny_llama):
    sorted(tiny_llama.glob("*.safetensors"))[1].unlink()
    with pytest.raises(CorruptCheckpoint, match="listed in the index but missing"):
        WeightStore(tiny_llama)


def test_truncated_shard(tiny_llama):
    shard = sorted(tiny_llama.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        WeightStore(tiny_llama)


def test_garbage_shard(tiny_llama):
    shard = sorted(tiny_llama.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64)
    with pytest.raises(CorruptCheckpoint, match="corrupt header"):
        WeightStore(tiny_llama)


@pytest.mark.parametrize("content", [None, "{not json"])
def test_missing_or_malformed_config(tiny_llama, content):
    cfg = tiny_llama / "config.json"
    if content is None:
        cfg.unlink()
    else:
        cfg.write_text(content)
    with pytest.raises(CorruptCheckpoint, match="config.json"):
        WeightStore(tiny_llama)


def test_nan_in_source_weights(tiny_llama):
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.up_proj.weight"
    shard = tiny_llama / index[key]
    tensors = load_file(shard)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpoint, match="NaN or Inf"):
        WeightStore(tiny_llama).block_state(0)
