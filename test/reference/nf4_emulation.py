"""NumPy emulation of bitsandbytes NF4 + double quantization (qlora-spec.md §1-2).

Independent of bitsandbytes (which the reference machine does not have) and of our TypeScript
quantizer: it is the "other implementation" the TS code is checked against bit-for-bit.
Everything is float32 with explicit roundings, following the CUDA rules of the spec except for
the reciprocal, which is IEEE float32 here (bnb's fast-math rcp can differ by an ulp; see spec §1.3).

Public API (all arrays float32 / uint8, no torch needed):
  nf4_quantize(w)            -> (packed uint8 [(n+1)//2], absmax f32 [nblocks])
  double_quantize(absmax)    -> (absmax_q uint8 [nblocks], nested_absmax f32 [ceil(nblocks/256)], offset f32)
  double_dequantize(absmax_q, nested_absmax, offset) -> absmax f32 [nblocks]
  nf4_dequantize(packed, absmax, n) -> f32 [n]
  quantize_weight(w)         -> dict(packed, absmax(u8), nested_absmax, offset, dequant) for a 2-D weight
  self_test()                -> runs the spec §1.7 test vector (raises AssertionError on mismatch)

Run `python3 test/reference/nf4_emulation.py` to execute the self test.
"""

from __future__ import annotations

import hashlib

import numpy as np

BLOCKSIZE = 64  # NF4 block (transformers never changes it)
NESTED_BLOCKSIZE = 256  # double-quant block, hard-coded in bitsandbytes


def _from_hex(words: list[str]) -> np.ndarray:
    """Big-endian float32 hex literals -> float32 array (exact bit patterns, no decimal parsing)."""
    return np.array([int(w, 16) for w in words], dtype=np.uint32).view(np.float32)


# §1.1: NF4 code values, index = 4-bit code (hex literals, NOT recomputed quantiles).
NF4_TABLE = _from_hex(
    "bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
    "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000".split()
)

# §1.3 step 4: thresholds are the float32 midpoints of consecutive table entries.
# (c[k] + c[k+1]) rounds once in float32; * 0.5 is exact.
NF4_THRESHOLDS = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) * np.float32(0.5)).astype(np.float32)

# The spec lists the thresholds in decimal; they must agree bit-for-bit with the computed midpoints.
_SPEC_THRESHOLDS = np.array(
    [
        -0.8480963706970215, -0.6106328964233398, -0.4599952697753906, -0.33967941999435425,
        -0.23460739850997925, -0.13791173696517944, -0.045525018125772476, 0.03979014977812767,
        0.120255246758461, 0.2035212516784668, 0.2920137643814087, 0.3893125355243683,
        0.5016634464263916, 0.6427869200706482, 0.8614784479141235,
    ],
    dtype=np.float32,
)
assert np.array_equal(NF4_THRESHOLDS.view(np.uint32), _SPEC_THRESHOLDS.view(np.uint32)), "NF4 thresholds"

# §2: signed dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)), 256 entries.
_DYN_HEX = """
bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333
bf44999a bf410000 bf3d6666 bf39cccd bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd bf123334 bf0e999a
bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000
bea2cccc be9b999a be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333 be18cccd be0a6666 bdf80000 bddb3334
bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d
bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15 bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148
bc1f3b64 bc160418 bc0ccccd bc039581 bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d baf1a9fc baa7ef9d
ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000
3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1 3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d
3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148
3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d
3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 3dc9eb85 3ddb3334
3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd 3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000
3eb13333 3eb86666 3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a
3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333
3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000
"""
DYNAMIC_MAP = _from_hex(_DYN_HEX.split())
assert DYNAMIC_MAP.shape == (256,)
assert np.all(np.diff(DYNAMIC_MAP) > 0), "dynamic map must be strictly ascending"
assert DYNAMIC_MAP[127] == 0.0 and DYNAMIC_MAP[255] == 1.0 and DYNAMIC_MAP[0] == np.float32(-0.99296875)

# Nearest-entry search boundaries: float32 midpoints (lo + hi) * 0.5f, as the CUDA final midpoint test.
DYNAMIC_MIDPOINTS = ((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) * np.float32(0.5)).astype(np.float32)


def _blockwise_absmax(x: np.ndarray, bs: int) -> np.ndarray:
    """max |x| per block of bs consecutive elements (last block may be short); float32, exact."""
    n = x.size
    nblocks = (n + bs - 1) // bs
    padded = np.zeros(nblocks * bs, dtype=np.float32)  # zero padding never raises a max of |x|
    padded[:n] = np.abs(x)
    return padded.reshape(nblocks, bs).max(axis=1).astype(np.float32)


def nf4_codes(w: np.ndarray, blocksize: int = BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
    """Codes (uint8 0..15, one per element, padded to even length) and absmax f32 [nblocks].

    w is flattened row-major ([out, in] for a Linear weight). Blocks run across row boundaries.
    """
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    if w.dtype != np.float32:
        raise TypeError(f"nf4_codes expects float32, got {w.dtype}")
    n = x.size
    absmax = _blockwise_absmax(x, blocksize)
    # Out-of-range lanes of the last block are loaded as 0.0 (spec §1.3 step 5), so an odd n gets
    # the code of 0.0 in its padding nibble through the same path.
    n_even = n + (n & 1)
    xp = np.zeros(n_even, dtype=np.float32)
    xp[:n] = x
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1.0) / absmax).astype(np.float32)  # reciprocal in float32 (inf for an all-zero block)
        block_of = np.arange(n_even) // blocksize
        xn = (xp * inv[block_of]).astype(np.float32)  # multiply by the reciprocal, NOT a division
    # code = number of thresholds strictly below xn (side="left": ties go to the lower code)
    codes = np.searchsorted(NF4_THRESHOLDS, xn, side="left").astype(np.uint8)
    codes[np.isnan(xn)] = 0  # NaN fails every comparison (all-zero block: 0 * inf = NaN -> code 0)
    return codes, absmax


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Even element -> high nibble, odd -> low nibble. codes length must be even."""
    assert codes.size % 2 == 0
    c = codes.astype(np.uint8)
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    p = packed.reshape(-1).astype(np.uint8)
    out = np.empty(p.size * 2, dtype=np.uint8)
    out[0::2] = p >> 4
    out[1::2] = p & 0x0F
    return out[:n]


def nf4_quantize(w: np.ndarray, blocksize: int = BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
    """-> packed uint8 [(n+1)//2] (flat; bnb stores it as [(n+1)//2, 1]), absmax f32 [nblocks]."""
    codes, absmax = nf4_codes(w, blocksize)
    return pack_nibbles(codes), absmax


def nf4_dequantize(packed: np.ndarray, absmax: np.ndarray, n: int, blocksize: int = BLOCKSIZE) -> np.ndarray:
    """w[k] = table[code[k]] * absmax[k // bs], one float32 rounding."""
    codes = unpack_nibbles(packed, n)
    a = np.asarray(absmax, dtype=np.float32)
    return (NF4_TABLE[codes] * a[np.arange(n) // blocksize]).astype(np.float32)


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """absmax f32 [nblocks] -> (codes u8 [nblocks], nested_absmax f32 [ceil(nblocks/256)], offset f32).

    offset = float32 of the float64 mean (torch's float32 reduction order is not reproducible; the
    offset is stored, so a consumer reads it instead of recomputing it).
    Codes: nearest entry of the signed dynamic map to (absmax - offset) * (1/nested_absmax), ties -> lower index.
    """
    a = np.asarray(absmax, dtype=np.float32)
    offset = np.float32(np.mean(a, dtype=np.float64))
    centered = (a - offset).astype(np.float32)
    nested = _blockwise_absmax(centered, NESTED_BLOCKSIZE)
    if np.any(nested == 0):
        # All absmax in a chunk equal to the mean: 0 * inf = NaN. Never happens for random weights;
        # refuse rather than invent a rule the spec does not state.
        raise ValueError("double_quantize: a nested block has zero range (all absmax equal)")
    inv = (np.float32(1.0) / nested).astype(np.float32)
    y = (centered * inv[np.arange(a.size) // NESTED_BLOCKSIZE]).astype(np.float32)
    codes = np.searchsorted(DYNAMIC_MIDPOINTS, y, side="left").astype(np.uint8)
    return codes, nested, offset


def double_dequantize(codes: np.ndarray, nested_absmax: np.ndarray, offset: np.float32) -> np.ndarray:
    """(dyn[q] * nested_absmax[i // 256]) + offset, two separate float32 roundings (no FMA)."""
    q = np.asarray(codes, dtype=np.uint8)
    prod = (DYNAMIC_MAP[q] * np.asarray(nested_absmax, dtype=np.float32)[np.arange(q.size) // NESTED_BLOCKSIZE]).astype(
        np.float32
    )
    return (prod + np.float32(offset)).astype(np.float32)


def quantize_weight(w: np.ndarray) -> dict:
    """Full QLoRA storage of one weight (NF4 + double quant) and the float32 values training sees."""
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    n = w32.size
    packed, absmax = nf4_quantize(w32)
    absmax_q, nested, offset = double_quantize(absmax)
    absmax_dq = double_dequantize(absmax_q, nested, offset)
    dequant = nf4_dequantize(packed, absmax_dq, n).reshape(w32.shape)
    return {
        "packed": packed,  # uint8 [(n+1)//2]
        "absmax": absmax_q,  # uint8 [nblocks]
        "nested_absmax": nested,  # float32 [ceil(nblocks/256)]
        "offset": np.array([offset], dtype=np.float32),  # float32 [1]
        "absmax_f32": absmax,  # float32 [nblocks], before double quant (not saved; diagnostics)
        "dequant": dequant,  # float32, same shape as w
    }


TEST_VECTOR_SHA256 = "e7c717345277ddd22cb7a7d9efe1a54d3bf84b2b2e0d6e432d17e093cfe9a08f"


def self_test() -> None:
    """Spec §1.7 test vector + a few structural checks. Raises AssertionError on any mismatch."""
    i = np.arange(130)
    x = ((((i * 37) % 101) - 50) / 64).astype(np.float32)
    packed, absmax = nf4_quantize(x)
    assert packed.size == 65
    assert absmax.tolist() == [0.78125, 0.78125, 0.625], absmax
    codes = unpack_nibbles(packed, 130)
    assert codes[:8].tolist() == [0, 4, 12, 1, 6, 14, 2, 9], codes[:8]
    assert bytes(packed[:8]).hex() == "04c16e29f3b05d17", bytes(packed[:8]).hex()
    digest = hashlib.sha256(bytes(packed)).hexdigest()
    assert digest == TEST_VECTOR_SHA256, f"NF4 test vector SHA-256 {digest} != {TEST_VECTOR_SHA256}"
    deq = nf4_dequantize(packed, absmax, 130)
    expect = np.array([-0.78125, -0.22221982, 0.34430456, -0.54390061], dtype=np.float32)
    assert np.allclose(deq[:4], expect, rtol=0, atol=1e-7), deq[:4]

    # Ties go to the lower code: a value exactly on a threshold (absmax 1 so xn == x).
    t = np.zeros(64, dtype=np.float32)
    t[0] = 1.0
    t[1:16] = NF4_THRESHOLDS
    c, _ = nf4_codes(t)
    assert c[1:16].tolist() == list(range(15)), c[1:16]
    # All-zero block: every code 0 (CUDA: 0 * inf = NaN); dequantizes to -0.0.
    z, za = nf4_codes(np.zeros(64, dtype=np.float32))
    assert np.all(z == 0) and za[0] == 0.0
    # Odd n: padding nibble is the code of 0.0 (7). 1.0 -> 15, -1.0 -> 0, 0.5 -> 12 (0.5 < 0.50166).
    p3, _ = nf4_quantize(np.array([1.0, -1.0, 0.5], dtype=np.float32))
    assert bytes(p3).hex() == "f0c7", bytes(p3).hex()

    # Double quant: an entry exactly on a dynamic-map midpoint goes to the lower index,
    # and each exact table value maps back to itself.
    y_codes = np.searchsorted(DYNAMIC_MIDPOINTS, DYNAMIC_MIDPOINTS, side="left")
    assert y_codes.tolist() == list(range(255))
    assert np.searchsorted(DYNAMIC_MIDPOINTS, DYNAMIC_MAP, side="left").tolist() == list(range(256))
    # Round trip on a realistic absmax vector: error bounded by the map's local spacing.
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal(0, 0.1, size=(64 * 600,)).astype(np.float32))
    am = _blockwise_absmax(a, 64)
    q, nested, off = double_quantize(am)
    assert nested.shape == ((am.size + 255) // 256,)
    back = double_dequantize(q, nested, off)
    assert np.max(np.abs(back - am)) < 0.02 * float(np.max(nested)) + 1e-7
    # The extreme of each nested chunk maps to +-1.0 within one table step.
    assert set(np.unique(q[np.argmax(np.abs(am[:256] - off))]).tolist()) <= {0, 255}


if __name__ == "__main__":
    self_test()
    print("nf4_emulation self test: OK (spec §1.7 SHA-256 matches)")
