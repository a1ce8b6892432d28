"""A model seen one block at a time: a full-precision checkpoint or a frugal-qat run directory.

:class:`ModelSource` is the only way the rest of frugal-qat gets at a model's layers. It never builds the whole
model: ``block(i)`` builds decoder layer i from its tensors alone, ``embed``/``final_norm``/``lm_head`` read the
few remaining tensors when asked. A run directory's packed blocks are dequantized one block at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from frugal_qat.arch import (
    EMBED_KEY,
    LM_HEAD_KEY,
    NORM_KEY,
    BlockRunner,
    LinearShape,
    arch_for,
    build_block,
    fill_buffers,
    hf_config,
    linear_shapes,
    logit_softcap,
    rotary,
    softcap,
)
from frugal_qat.checkpoint.run_dir import read_quant_config
from frugal_qat.offload.weights import WeightStore
from frugal_qat.quantizer import dequantize, kquant, unpack_linear


class ModelSource:
    def __init__(self, model_dir: str | Path, seqlen: int | None = None):
        self.dir = Path(model_dir)
        self.store = WeightStore(self.dir)
        self.config = self.store.config
        self.arch = arch_for(self.config)
        self.hf = hf_config(self.config, seqlen)
        self.n_layers = int(self.hf.num_hidden_layers)
        self.hidden = int(self.hf.hidden_size)
        self.quant = read_quant_config(self.dir)  # None for a full-precision checkpoint
        self.tied = bool(getattr(self.hf, "tie_word_embeddings", False)) or not self.store.has(LM_HEAD_KEY)

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors as fp32 dense weights (packed linears dequantized: ``(q - z) * s`` for a plain run,
        the ggml blocks decoded by ``kquant.dequantize`` for a run trained in a GGUF grid)."""
        if self.quant is None:
            return self.store.block_state(i, torch.float32)
        raw = self.store.block_state(i, dtype=None)
        bits, group = self.quant["bits"], self.quant["group_size"]
        out = {}
        for key, t in raw.items():
            if key.endswith(".ggml"):
                base = key[: -len(".ggml")]
                gtype = kquant.TYPES[self.quant["gguf_types"][base]]
                out[f"{base}.weight"] = kquant.dequantize(t, gtype, t.shape[1] // gtype.type_size * gtype.block)
            elif key.endswith(".qweight"):
                base = key[: -len(".qweight")]
                packed = {n: raw[f"{base}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx")}
                in_f, out_f = packed["g_idx"].numel(), packed["scales"].shape[1]
                codes, scale, zero = unpack_linear(packed, bits, group, in_f, out_f)
                out[f"{base}.weight"] = dequantize(codes, scale, zero, group)
            elif key.rsplit(".", 1)[-1] in ("qzeros", "scales", "g_idx"):
                continue
            else:
                out[key] = t.float()
        return out

    def block(self, i: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        return build_block(self.hf, self.arch, i, state if state is not None else self.block_state(i))

    def rotary(self) -> nn.Module:
        return rotary(self.hf, self.arch)

    def fill_buffers(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        """Give this model's causal LM, built on the meta device, the buffers no checkpoint holds (rotary
        ``inv_freq``, Gemma's ``embed_scale``), computed in fp32 on ``device``."""
        fill_buffers(model, self.hf, self.arch, device)

    def runner(self, device: torch.device | str = "cpu") -> BlockRunner:
        """What runs block i on hidden states: ``src.runner(device)(block, i, x)``."""
        return BlockRunner(self.hf, self.arch, device)

    def linear_shapes(self) -> tuple[LinearShape, ...]:
        return linear_shapes(self.hf, self.arch)

    def embed_weight(self) -> torch.Tensor:
        return self.store.get(EMBED_KEY)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Block 0's input for token ids ``[b, L]``: ``[b, L, H]``. ``weight``: the table, when the caller already
        holds it (it is read from the shards otherwise).

        The rows as stored (the table's dtype), or for a scaled embedding (Gemma) ``row * sqrt(H)`` computed in fp32,
        as the model computes it when loaded in fp32 (in bf16, transformers rounds the scale to bf16 first)."""
        weight = self.embed_weight() if weight is None else weight
        rows = weight[ids.long()]
        if not self.arch.scaled_embedding:
            return rows
        return rows.float() * torch.tensor(float(self.hidden) ** 0.5)

    def final_norm(self) -> nn.Module:
        norm = self.arch.norm_cls(self.hidden, eps=self.hf.rms_norm_eps)
        norm.weight.data = self.store.get(NORM_KEY, torch.float32)
        return norm.eval()

    def lm_head_weight(self) -> torch.Tensor:
        return self.store.get(EMBED_KEY if self.tied else LM_HEAD_KEY)

    def logits(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """The model's logits for final-normed hidden states ``h [..., H]``: ``h @ head.T``, soft-capped where the
        family caps them (Gemma 2: ``30 * tanh(logits / 30)``)."""
        return softcap(h @ head.T, logit_softcap(self.hf))
