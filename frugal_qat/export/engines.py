"""Which inference engines load an export, per format, bit width and zero-point convention: one line each.

Every claim has a basis: ``"checked"`` (run on this project's CPU machine, by the test suite or by
``tools/bench_export.py``, with the versions in ``CHECKED_VERSIONS``) or ``"not checked"`` (read from the engine's
source or documentation, or needing a GPU we do not have; the note says which). ``export_run`` logs one line per
export and stores them in the report and the export's README, and docs/EXPORT.md has the same table with the
measurements. frugal-qat's exports are always asymmetric (``sym: false``, an integer zero point per group).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The versions the "checked" entries were run with (docs/EXPORT.md, tools/bench_export.py).
CHECKED_VERSIONS = {
    "transformers": "5.24.0",
    "optimum": "2.3.0",
    "gptqmodel": "7.7.0",
    "compressed-tensors": "0.20.1",
    "auto-round": "0.16.1",
}
_V = CHECKED_VERSIONS
_TF_GPTQ = f"transformers {_V['transformers']} + optimum {_V['optimum']} + gptqmodel {_V['gptqmodel']}"


@dataclass(frozen=True)
class EngineSupport:
    engine: str
    loads: bool
    basis: str  # "checked" | "not checked"
    note: str = ""

    def text(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.engine}{note} [{self.basis}]"


def engine_support(fmt: str, bits: int, zero_point: str = "v2") -> list[EngineSupport]:
    """What loads (and what does not load) an asymmetric ``bits``-bit export in ``fmt``."""
    if fmt == "gptq":
        return _gptq(bits, zero_point)
    if fmt == "compressed-tensors":
        return _compressed_tensors(bits)
    if fmt == "fp16":
        return [
            EngineSupport(f"transformers {_V['transformers']}", True, "checked"),
            EngineSupport("vLLM, SGLang, llama.cpp's convert_hf_to_gguf.py and other readers of dense Hugging Face "
                          "checkpoints", True, "not checked", "a plain dense checkpoint; not run here"),
        ]
    raise ValueError(f"unknown format {fmt!r}")


def _gptq(bits: int, zero_point: str) -> list[EngineSupport]:
    vllm = EngineSupport(
        "vLLM", False, "not checked",
        "its GPTQ kernels take 4- and 8-bit symmetric files; no path for asymmetric GPTQ; needs a GPU, not run here")
    if zero_point == "v2":
        return [
            EngineSupport(f"GPTQModel {_V['gptqmodel']} (GPTQModel.load)", True, "checked",
                          "on CPU it picks bf16 unless given dtype=torch.float16"),
            EngineSupport(_TF_GPTQ, True, "checked"),
            EngineSupport(f"AutoRound {_V['auto-round']} (transformers AutoRoundConfig)", False, "checked",
                          "transformers refuses gptq_v2 for it; it would read the zero points as v1"),
            vllm,
        ]
    return [
        EngineSupport(_TF_GPTQ, True, "checked"),
        EngineSupport(f"GPTQModel {_V['gptqmodel']} (GPTQModel.load)", False, "checked",
                      "refuses asymmetric v1 files not written by GPTQModel; use zero_point v2"),
        EngineSupport(f"AutoRound {_V['auto-round']} (transformers AutoRoundConfig)", False, "checked",
                      "accepts the config, then fails on CPU (run at 2 bits): its backend table has no CPU kernel "
                      "for asymmetric GPTQ at any width and its fallback layer raises a TypeError; GPU kernels not "
                      "run here"),
        vllm,
    ]


def _compressed_tensors(bits: int) -> list[EngineSupport]:
    out = [
        EngineSupport(f"transformers {_V['transformers']} + compressed-tensors {_V['compressed-tensors']}", True,
                      "checked", "with CompressedTensorsConfig(dequantize=True); its default path fails for every "
                      "asymmetric pack-quantized file (zero-point shape bug, docs/EXPORT.md)"),
    ]
    if bits in (4, 8):
        out.append(EngineSupport("vLLM", True, "not checked",
                                 "its WNA16 scheme takes 4 and 8 bits; asymmetric zero points and these files "
                                 "not run here (needs a GPU)"))
    else:
        out.append(EngineSupport("vLLM", False, "not checked",
                                 f"its WNA16 scheme takes 4 and 8 bits, not {bits}; not run here (needs a GPU)"))
    return out


def engine_line(fmt: str, bits: int, zero_point: str = "v2", dtype: str = "float16") -> str:
    """One line: ``gptq (gptq_v2, 2-bit asymmetric): loads in A [checked], B [...]; does not load in C [...]``."""
    what = {"gptq": "gptq_v2" if zero_point == "v2" else "gptq v1", "compressed-tensors": "pack-quantized",
            "fp16": f"dense {dtype}"}[fmt]
    support = engine_support(fmt, bits, zero_point)
    yes = "; ".join(e.text() for e in support if e.loads) or "nothing checked"
    no = "; ".join(e.text() for e in support if not e.loads)
    head = f"{fmt} ({what}, {bits}-bit asymmetric)" if fmt != "fp16" else f"{fmt} ({what}, from {bits}-bit)"
    return f"{head}: loads in {yes}" + (f"; does not load in {no}" if no else "")


def engine_table(fmt: str, bits: int, zero_point: str = "v2") -> list[dict]:
    return [asdict(e) for e in engine_support(fmt, bits, zero_point)]


__all__ = ["CHECKED_VERSIONS", "EngineSupport", "engine_line", "engine_support", "engine_table"]
