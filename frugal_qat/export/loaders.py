"""How users load each export: every library's defaults on the device at hand, and the settings we recommend.

The verification (``verify.py``) loads an export through each :class:`Loader` of its format and compares the
perplexity with frugal-qat's own; the README of the export shows the same calls. A loader's call is written once,
as keyword arguments (``Arg``), and both shown to the user and used to load, so the two cannot drift apart.

Why the recommended settings differ from the defaults (measured in docs/EXPORT.md):

- GPTQ: GPTQModel picks bf16 on CPU whatever the config says (gptqmodel 7.7.0 ``auto_dtype``); bf16 rounds each
  fp16 scale to 8 significant bits, which moves all weights of a group the same way (issue 17 measured +22 %
  held-out perplexity on a w2 SmolLM2-135M run; docs/EXPORT.md has our measurements). Its kernels refuse fp32,
  so we recommend the export's dtype, float16 unless the source model is bf16-native (fp16 could then overflow
  its activations). gptqmodel's auto-selected CPU int4 kernels
  compute group size -1 wrongly, so 4-bit per-channel exports also ask for ``backend="torch"``.
- compressed-tensors: transformers' default (keep-compressed) path fails for asymmetric pack-quantized files in
  compressed-tensors 0.20 (it sizes ``weight_zero_point`` unpacked); ``CompressedTensorsConfig(dequantize=True)``
  loads them. Dequantized models run in fp32 on CPU (exact, and faster there than fp16 or bf16).
- fp16 (dense): the config's dtype by default; fp32 on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Arg:
    """One keyword argument of a loader call: its name, the Python text users see, and how to build its value."""

    name: str
    text: str
    make: Callable[[], Any]


@dataclass(frozen=True)
class Loader:
    """One way to load an export: a library's entry point and keyword arguments, labelled defaults/recommended."""

    library: str  # "gptqmodel" (GPTQModel.load) | "transformers" (AutoModelForCausalLM.from_pretrained)
    settings: str  # "defaults" | "recommended"
    args: tuple[Arg, ...]
    packages: tuple[str, ...]  # distributions it needs (pip names)
    known_failure: str = ""  # why this call fails or computes wrongly today, where we know (named in the warning)
    label: str = ""  # the library's name in reports, when not GPTQModel.load / transformers

    @property
    def name(self) -> str:
        lib = self.label or ("GPTQModel.load" if self.library == "gptqmodel" else "transformers")
        return f"{lib} ({self.settings})"

    @property
    def call(self) -> str:
        fn = "GPTQModel.load" if self.library == "gptqmodel" else "AutoModelForCausalLM.from_pretrained"
        return f"{fn}(PATH" + "".join(f", {a.name}={a.text}" for a in self.args) + ")"

    def load(self, path: Path) -> torch.nn.Module:
        """The transformers model object (GPTQModel's wrapper unwrapped), in eval mode."""
        kwargs = {a.name: a.make() for a in self.args}
        if self.library == "gptqmodel":
            from gptqmodel import GPTQModel

            return GPTQModel.load(str(path), **kwargs).model.eval()
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _dtype(dtype: torch.dtype) -> Arg:
    name = str(dtype).removeprefix("torch.")
    return Arg("dtype", f"torch.{name}", lambda: dtype)


def _gptq_torch_backend(bits: int) -> Arg:
    def make():
        from transformers import GPTQConfig

        return GPTQConfig(bits=bits, backend="torch")

    return Arg("quantization_config", f'GPTQConfig(bits={bits}, backend="torch")', make)


def _gptqmodel_torch_backend() -> Arg:
    def make():
        from gptqmodel import BACKEND

        return BACKEND.TORCH

    return Arg("backend", "BACKEND.TORCH", make)


def _ct_dequantize() -> Arg:
    def make():
        from transformers import CompressedTensorsConfig

        return CompressedTensorsConfig(dequantize=True)

    return Arg("quantization_config", "CompressedTensorsConfig(dequantize=True)", make)


def loaders_for(fmt: str, quant: dict[str, Any] | None, export_dtype: str, device: torch.device) -> list[Loader]:
    """The loaders verification runs for an export in ``fmt`` (``quant``: its config.json quantization_config)."""
    on_cuda = device.type == "cuda"
    where = (Arg("device_map", '"cuda"', lambda: "cuda"),) if on_cuda else ()
    tf_defaults = Loader("transformers", "defaults", where, ())
    if fmt == "gptq":
        bits, group = quant["bits"], quant["group_size"]
        gptq_pkgs = ("optimum", "gptqmodel")
        kernel_dtype = _dtype(torch.bfloat16 if export_dtype == "bfloat16" else torch.float16)
        fix_kernel = bits == 4 and group == -1  # gptqmodel 7.7.0's fused CPU int4 kernels get g = -1 wrong
        tf_rec = (kernel_dtype, *((_gptq_torch_backend(bits),) if fix_kernel else ()), *where)
        bug = "gptqmodel 7.7.0's auto-selected CPU int4 kernels compute group size -1 wrongly" if fix_kernel else ""
        out = [Loader("transformers", "defaults", where, gptq_pkgs, known_failure=bug),
               Loader("transformers", "recommended", tf_rec, gptq_pkgs)]
        if quant.get("checkpoint_format", quant.get("format")) == "gptq_v2":  # GPTQModel.load refuses our v1 files
            rec = (kernel_dtype, *((_gptqmodel_torch_backend(),) if fix_kernel else ()))
            out = [Loader("gptqmodel", "defaults", (), ("gptqmodel",), known_failure=bug),
                   Loader("gptqmodel", "recommended", rec, ("gptqmodel",)), *out]
        return out
    dense = _dtype(getattr(torch, export_dtype) if on_cuda else torch.float32)
    if fmt == "compressed-tensors":
        pkgs = ("compressed-tensors",)
        bug = ("compressed-tensors' keep-compressed path sizes weight_zero_point unpacked ([out, G] instead of "
               "[ceil(out*b/32), G]) for every asymmetric pack-quantized file, its own included (docs/EXPORT.md)")
        return [Loader("transformers", "defaults", where, pkgs, known_failure=bug),
                Loader("transformers", "recommended", (dense, _ct_dequantize(), *where), pkgs)]
    return [tf_defaults, Loader("transformers", "recommended", (dense, *where), ())]


__all__ = ["Arg", "Loader", "loaders_for"]
