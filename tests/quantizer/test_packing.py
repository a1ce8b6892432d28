import pytest
import torch

from frugal_qat.quantizer.packing import (
    pack_linear,
    pack_rows,
    packed_rows,
    unpack_linear,
    unpack_rows,
)
from frugal_qat.quantizer.primitives import init_qparams, quantize, round_zero

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]
SEEDS = [0, 1, 2]


def as_int32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def loop_pack_column(values: list[int], bits: int) -> list[int]:
    """Reference: set stream bit j*b + t for every bit t of every value j, then cut into 32-bit words."""
    n_words = -(-len(values) * bits // 32)
    words = [0] * n_words
    for j, v in enumerate(values):
        for t in range(bits):
            if (v >> t) & 1:
                pos = j * bits + t
                words[pos // 32] |= 1 << (pos % 32)
    return [as_int32(w) for w in words]


def random_codes(k, n, bits, seed):
    return torch.randint(0, 2**bits, (k, n), generator=torch.Generator().manual_seed(seed))


# --- hand-computed layouts -----------------------------------------------------------------------


def test_4bit_values_1_to_8_make_0x87654321():
    packed = pack_rows(torch.arange(1, 9).reshape(8, 1), 4)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[as_int32(0x87654321)]] == [[-2023406815]]


def test_2bit_and_8bit_examples():
    # 2 bits: 16 values per word, value j at bits 2j.
    values = [3, 0, 1, 2] + [0] * 12
    assert pack_rows(torch.tensor(values).reshape(16, 1), 2).item() == 0b10_01_00_11
    # 8 bits: 4 bytes per word, little end first; 0xFF in the top byte makes the word negative.
    assert pack_rows(torch.tensor([[0x01], [0x02], [0x03], [0xFF]]), 8).item() == as_int32(0xFF030201)


def test_3bit_docstring_example():
    codes = torch.tensor([j % 8 for j in range(32)]).reshape(32, 1)
    packed = pack_rows(codes, 3)
    assert packed.flatten().tolist() == [-1996831096, -964101434, -87652102]
    assert [w & 0xFFFFFFFF for w in packed.flatten().tolist()] == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]


@pytest.mark.parametrize(
    "slot, words",
    [
        (10, [0b11 << 30, 0b1, 0]),  # low 2 bits at the top of word 0, high bit at bit 0 of word 1
        (21, [0, 1 << 31, 0b11]),  # low bit at the top of word 1, high 2 bits at the bottom of word 2
        (0, [0b111, 0, 0]),
        (31, [0, 0, 0b111 << 29]),
    ],
)
def test_3bit_straddling_values(slot, words):
    codes = torch.zeros(32, 1, dtype=torch.uint8)
    codes[slot] = 7
    packed = pack_rows(codes, 3)
    assert packed.flatten().tolist() == [as_int32(w) for w in words]
    assert torch.equal(unpack_rows(packed, 3, 32), codes)


# --- pack_rows / unpack_rows ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 100, 256])
@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_bitstream_loop_and_round_trips(bits, k, n):
    codes = random_codes(k, n, bits, seed=k * 1000 + n)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(k, bits), n) == (-(-k * bits // 32), n)
    expected = [loop_pack_column(codes[:, c].tolist(), bits) for c in range(n)]
    assert packed.t().tolist() == expected
    unpacked = unpack_rows(packed, bits, k)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked, codes.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
def test_all_ones_fill_words_and_wrap_negative(bits):
    codes = torch.full((64, 3), 2**bits - 1)
    packed = pack_rows(codes, bits)
    assert (packed == -1).all()  # 0xFFFFFFFF stored as int32
    assert torch.equal(unpack_rows(packed, bits, 64), codes.to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_pack_rows_accepts_integer_dtypes_and_leaves_input_alone(dtype):
    codes = random_codes(40, 6, 3, seed=1).to(dtype)
    before = codes.clone()
    packed = pack_rows(codes, 3)
    assert torch.equal(codes, before)
    assert torch.equal(packed, pack_rows(codes.to(torch.int64), 3))
    # Non-contiguous input (a transposed view) packs like its contiguous copy.
    assert torch.equal(pack_rows(codes.t().t(), 3), packed)
    assert torch.equal(pack_rows(codes.t().contiguous().t(), 3), packed)


def test_pack_rows_errors():
    with pytest.raises(ValueError, match=r"codes range \[0, 8\] does not fit in 3 bits; expected \[0, 7\]"):
        pack_rows(torch.tensor([[0], [8]]), 3)
    with pytest.raises(ValueError, match=r"codes range \[-1, 2\]"):
        pack_rows(torch.tensor([[-1], [2]]), 2)
    with pytest.raises(ValueError, match="integer codes"):
        pack_rows(torch.zeros(4, 4), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_rows(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits 5 is not supported"):
        pack_rows(torch.zeros(8, 1, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match=r"cannot hold 33 values of 4 bits per column; expected 5 rows"):
        unpack_rows(torch.zeros(4, 2, dtype=torch.int32), 4, 33)


# --- pack_linear / unpack_linear -----------------------------------------------------------------


def quantized_layer(out, inp, bits, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    scale, zero = init_qparams(w, bits, group_size)
    scale = scale.half().float()  # what a frozen layer holds, so the fp16 round trip is exact
    return quantize(w, scale, zero, bits, group_size), scale, zero


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_pack_linear_round_trip(bits, group_size, seed):
    out, inp = 40, 256  # out = 40 leaves the last qzeros word part-filled for every bit width
    codes, scale, zero = quantized_layer(out, inp, bits, group_size, seed)
    g = inp if group_size == -1 else group_size
    n_groups = inp // g
    packed = pack_linear(codes, scale, zero, bits, group_size)
    assert set(packed) == {"qweight", "qzeros", "scales", "g_idx"}
    assert packed["qweight"].dtype == packed["qzeros"].dtype == packed["g_idx"].dtype == torch.int32
    assert packed["scales"].dtype == torch.float16
    assert packed["qweight"].shape == (inp * bits // 32, out)
    assert packed["qzeros"].shape == (n_groups, -(-out * bits // 32))
    assert packed["scales"].shape == (n_groups, out)
    assert torch.equal(packed["g_idx"], torch.arange(inp, dtype=torch.int32) // g)
    assert all(t.is_contiguous() for t in packed.values())
    # GPTQ orientation: qweight packs codes.T along in; qzeros packs along out, one row per group.
    assert torch.equal(packed["qweight"], pack_rows(codes.t().contiguous(), bits))
    for grp in range(n_groups):
        expected = loop_pack_column(zero[:, grp].long().tolist(), bits)
        assert packed["qzeros"][grp].tolist() == expected

    codes2, scale2, zero2 = unpack_linear(packed, bits, group_size, inp, out)
    assert codes2.dtype == torch.uint8 and scale2.dtype == zero2.dtype == torch.float32
    assert torch.equal(codes2, codes)
    assert torch.equal(scale2, scale)
    assert torch.equal(zero2, zero)


@pytest.mark.parametrize("bits", BITS)
def test_pack_linear_clamps_and_rounds_zero(bits):
    qmax = 2**bits - 1
    codes, scale, _ = quantized_layer(32, 64, bits, 32, seed=3)
    zero = torch.tensor([-4.0, qmax + 9.0, 1.4, 0.6]).repeat(16).reshape(32, 2)  # out of range, off-grid
    packed = pack_linear(codes, scale, zero, bits, 32)
    _, _, zero2 = unpack_linear(packed, bits, 32, 64, 32)
    assert torch.equal(zero2, round_zero(zero, bits))
    assert zero2.min() >= 0 and zero2.max() <= qmax


def test_pack_linear_does_not_modify_inputs():
    codes, scale, zero = quantized_layer(16, 64, 4, 32, seed=0)
    zero = zero + 0.3
    copies = [t.clone() for t in (codes, scale, zero)]
    pack_linear(codes, scale, zero, 4, 32)
    for t, c in zip((codes, scale, zero), copies):
        assert torch.equal(t, c)


def test_pack_linear_errors():
    codes, scale, zero = quantized_layer(16, 64, 4, 32, seed=0)
    with pytest.raises(ValueError, match="group size 48 does not divide in_features 64"):
        pack_linear(codes, scale, zero, 4, 48)
    with pytest.raises(ValueError, match=r"scale has shape \(16, 1\), expected \[out, G\] = \[16, 2\]"):
        pack_linear(codes, scale[:, :1], zero, 4, 32)


def test_unpack_linear_errors():
    codes, scale, zero = quantized_layer(16, 64, 4, 32, seed=0)
    packed = pack_linear(codes, scale, zero, 4, 32)
    with pytest.raises(ValueError, match="missing 'qzeros'"):
        unpack_linear({k: v for k, v in packed.items() if k != "qzeros"}, 4, 32, 64, 16)
    with pytest.raises(
        ValueError, match=r"qweight has shape \(8, 16\), expected \[8, 32\] for a 4-bit \[32, 64\] layer"
    ):
        unpack_linear(packed, 4, 32, 64, 32)
    reordered = dict(packed, g_idx=packed["g_idx"].flip(0))
    with pytest.raises(ValueError, match="desc_act"):
        unpack_linear(reordered, 4, 32, 64, 16)
    # g_idx is optional.
    no_gidx = {k: v for k, v in packed.items() if k != "g_idx"}
    assert torch.equal(unpack_linear(no_gidx, 4, 32, 64, 16)[0], codes)
