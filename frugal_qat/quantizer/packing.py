"""Bit packing of 2/3/4/8-bit codes into int32 words, in GPTQ's layout (notes §4).

Layout (``pack_rows``): the ``K`` values of each column of a ``[K, N]`` code matrix form one
continuous bitstream, least-significant bits first. Value ``j`` occupies stream bits
``[j*b, j*b + b)``, and packed word ``w`` of the column holds stream bits ``[32w, 32w + 32)``
(bit 0 of the word = stream bit ``32w``). So:

- b = 2, 4, 8: ``32 / b`` whole values per word; value ``j`` sits at bits ``(j % (32/b)) * b`` of
  word ``j // (32/b)``. This is GPTQ's layout.
- b = 3: 32 values fill exactly 3 words, and values 10 and 21 of each 32 straddle a word boundary.
  This is GPTQ's 3-bit layout (not the reference's 10-values-per-word layout, which no loader reads).

Words are stored as int32 and wrap like GPTQ's: a word with bit 31 set is negative. A ``K`` that does
not fill the last word is zero-padded; the packed height is ``ceil(K * b / 32)`` words.

Worked examples (one column):

- 4 bits, values ``1, 2, ..., 8``: one word ``0x87654321`` (value 1 in the lowest nibble), stored as
  the int32 ``-2023406815``.
- 3 bits, values ``j % 8`` for ``j = 0..31``: three words ``0x88FAC688, 0xC688FAC6, 0xFAC688FA``
  (int32 ``-1996831096, -964101434, -87652102``). Value 10 (= 2 = 0b010) has its low two bits ``10``
  in bits 30-31 of word 0 (the top nibble ``0x8`` = 0b1000) and its high bit ``0`` in bit 0 of word 1;
  value 21 (= 5 = 0b101) has its low bit in bit 31 of word 1 and its high bits ``10`` in bits 0-1 of
  word 2.

A quantized ``nn.Linear`` (``W[out, in]``, groups of ``g`` input columns, ``G = in // g``) is stored as
GPTQ's four tensors (``pack_linear``):

- ``qweight`` int32 ``[ceil(in*b/32), out]``: codes transposed to ``[in, out]``, packed along ``in``;
- ``qzeros``  int32 ``[G, ceil(out*b/32)]``: integer zero points, packed along ``out``, stored as is
  (GPTQ "v2"; the "v1" format stores ``z - 1``, which breaks for ``z = 0``);
- ``scales``  float16 ``[G, out]``;
- ``g_idx``   int32 ``[in]``, ``i // g`` (no activation reordering).

Dequantization: ``W[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]``, and the layer computes ``x @ W.T``
in ``nn.Linear`` terms.
"""

import torch

from frugal_qat.quantizer.primitives import (
    SUPPORTED_BITS,
    _check_qparams,
    _check_weight,
    resolve_group_size,
    round_zero,
)

_WORD_MASK = 0xFFFFFFFF


def packed_rows(k: int, bits: int) -> int:
    """Number of int32 words that hold ``k`` values of ``bits`` bits: ``ceil(k * bits / 32)``."""
    return -(-k * bits // 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each column of ``codes`` ``[K, N]`` into int32 words ``[ceil(K*b/32), N]`` (layout above).

    ``codes`` is any integer tensor with values in ``[0, 2^b - 1]``; it is not modified. Vectorised
    over ``K`` and ``N``: 32 values span exactly ``b`` words, and the Python loop runs over those
    ``b`` words and the value slots touching each, never over ``K``. Transient memory is about one
    byte per code plus the output, so a large layer can be packed on the host.

    Raises:
        ValueError: unsupported bits, a non-2-D or non-integer tensor, or values out of range.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D [K, N] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"pack_rows expects integer codes, got dtype {codes.dtype}")
    k, n = codes.shape
    if codes.numel() > 0:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > 2**bits - 1:
            raise ValueError(f"codes range [{lo}, {hi}] does not fit in {bits} bits; expected [0, {2**bits - 1}]")
    chunks = -(-k // 32)
    values = torch.zeros(chunks * 32, n, dtype=torch.uint8, device=codes.device)
    values[:k] = codes  # zero padding up to whole 32-value chunks
    values = values.reshape(chunks, 32, n)
    out = torch.empty(chunks, bits, n, dtype=torch.int32, device=codes.device)
    slots = _slots(bits)
    for word in range(bits):
        # int64 holds a whole word plus the bits of a value shifted past bit 31 (masked off below).
        acc = torch.zeros(chunks, n, dtype=torch.int64, device=codes.device)
        for j, w, shift in slots:
            if w == word:
                v = values[:, j].to(torch.int64)
                acc |= v << shift if shift >= 0 else v >> -shift
        acc &= _WORD_MASK
        # Wrap to int32 as GPTQ stores it: words >= 2^31 become negative.
        out[:, word] = torch.where(acc >= 2**31, acc - 2**32, acc)
    return out.reshape(chunks * bits, n)[: packed_rows(k, bits)]


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Exact inverse of ``pack_rows``: int32 ``[ceil(k*b/32), N]`` -> torch.uint8 codes ``[k, N]``.

    Raises:
        ValueError: unsupported bits, or a height that does not match ``k`` values of ``bits`` bits.
    """
    _check_bits(bits)
    if packed.dim() != 2 or packed.shape[0] != packed_rows(k, bits):
        raise ValueError(
            f"packed tensor of shape {tuple(packed.shape)} cannot hold {k} values of {bits} bits "
            f"per column; expected {packed_rows(k, bits)} rows"
        )
    n = packed.shape[1]
    chunks = -(-k // 32)
    words = torch.zeros(chunks * bits, n, dtype=torch.int64, device=packed.device)
    words[: packed.shape[0]] = packed.to(torch.int64) & _WORD_MASK  # undo the int32 wrap
    words = words.reshape(chunks, bits, n)
    out = torch.empty(chunks, 32, n, dtype=torch.uint8, device=packed.device)
    acc = torch.zeros(chunks, n, dtype=torch.int64, device=packed.device)
    slots = _slots(bits)
    for j in range(32):
        acc.zero_()
        for jj, w, shift in slots:
            if jj == j:
                acc |= words[:, w] >> shift if shift >= 0 else words[:, w] << -shift
        out[:, j] = acc & (2**bits - 1)
    return out.reshape(chunks * 32, n)[:k]


def pack_linear(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
) -> dict[str, torch.Tensor]:
    """Pack a quantized linear layer into GPTQ's ``qweight``, ``qzeros``, ``scales``, ``g_idx``.

    Args:
        codes: uint8 ``[out, in]`` codes from ``quantize``.
        scale: ``[out, G]``; stored as float16 (round it to fp16 before quantizing if the packed model
            must reproduce the fp32 one exactly, as ``QuantLinear.freeze_`` does).
        zero: ``[out, G]``; stored as ``round_zero(zero, bits)``, i.e. rounded and clamped to
            ``[0, 2^b - 1]`` (also for one-signed groups, unlike the reference).
        bits: 2, 3, 4 or 8.   group_size: ``g`` or -1.

    Returns:
        Contiguous tensors on the device of ``codes``: ``qweight`` int32 ``[ceil(in*b/32), out]``, ``qzeros``
        int32 ``[G, ceil(out*b/32)]``, ``scales`` float16 ``[G, out]``, ``g_idx`` int32 ``[in]``.
    """
    _check_weight(codes)
    in_features = codes.shape[1]
    g = resolve_group_size(group_size, in_features, bits)
    _check_qparams(codes.shape, scale, zero, g)
    zero_int = round_zero(zero, bits).to(torch.int64)
    return {
        "qweight": pack_rows(codes.t(), bits),
        # zero_int is [out, G]: packing its rows packs along out; transposing gives GPTQ's [G, words].
        "qzeros": pack_rows(zero_int, bits).t().contiguous(),
        "scales": scale.detach().t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(in_features, device=codes.device) // g).to(torch.int32),
    }


def unpack_linear(
    tensors: dict[str, torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_linear``: returns ``(codes uint8 [out, in], scale fp32 [out, G], zero fp32 [out, G])``.

    ``g_idx``, if present, must be ``i // g`` (checkpoints with activation reordering are refused).

    Raises:
        ValueError: a missing tensor, a shape that does not match the layer, or a reordered ``g_idx``.
    """
    g = resolve_group_size(group_size, in_features, bits)
    n_groups = in_features // g
    expected = {
        "qweight": (packed_rows(in_features, bits), out_features),
        "qzeros": (n_groups, packed_rows(out_features, bits)),
        "scales": (n_groups, out_features),
    }
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"packed layer is missing {key!r}; found keys {sorted(tensors)}")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{key} has shape {tuple(tensors[key].shape)}, expected {list(shape)} for a "
                f"{bits}-bit [{out_features}, {in_features}] layer with group size {g}"
            )
    if "g_idx" in tensors:
        g_idx = tensors["g_idx"]
        if not torch.equal(g_idx.to(torch.int64), torch.arange(in_features, device=g_idx.device) // g):
            raise ValueError(
                f"g_idx is not i // {g} (activation reordering / desc_act); only desc_act=false "
                f"checkpoints are supported"
            )
    codes = unpack_rows(tensors["qweight"], bits, in_features).t().contiguous()
    zero = unpack_rows(tensors["qzeros"].t(), bits, out_features).float()
    scale = tensors["scales"].t().float().contiguous()
    return codes, scale, zero


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """``(j, word, shift)`` for each value slot ``j`` of a 32-value chunk and each word it touches.

    ``shift = j*b - 32*word`` is where the value's bit 0 falls in that word; it is negative for the
    word that receives the high bits of a value straddling a boundary (3-bit slots 10 and 21).
    """
    return [
        (j, word, j * bits - 32 * word)
        for j in range(32)
        for word in range(j * bits // 32, (j * bits + bits - 1) // 32 + 1)
    ]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits {bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
