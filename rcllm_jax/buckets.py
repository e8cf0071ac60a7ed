"""Shape buckets: a serving process compiles one program per bucket, never per request length.

Two rules. `bucket` (four per octave) pads rows that are computed through the whole model (full
and prefix modes' prompts, the block modes' recompute set): the padding is compute, so it is kept
small. `coarse_bucket` (powers of two) pads the other dimensions the block modes' request programs
are shaped by — rows that are only read (the user's cached prefix, the stitched suffix whose
cached rows are attended, not computed) and the answer's output rows: few buckets per dimension
keep the whole set of shapes a server accepts small enough to compile before serving
(`engine/warm_up.py`). The same powers of two size a remote shard's fetch buffer (at least 16 rows)
and a serving step's requests per shard (`coarse_bucket(n, 1)`).
"""


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest bucket >= max(n, minimum). Buckets: 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...
    (four per octave, multiples of 4): at most 25% padding, ~10% on average, and a bounded number
    of compiled programs (4 per doubling of the prompt length)."""
    n = max(n, minimum, 4)
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    step = max(1, p // 8)  # quarter steps between p/2 and p
    return -(-n // step) * step


def coarse_bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (one program per doubling)."""
    return 1 << (max(int(n), minimum, 1) - 1).bit_length()


def coarse_buckets(lo: int, hi: int, minimum: int = 16) -> list[int]:
    """Every `coarse_bucket` of a length in [lo, hi], ascending."""
    out, b = [], coarse_bucket(lo, minimum)
    while lo <= hi and b <= coarse_bucket(hi, minimum):
        out.append(b)
        b *= 2
    return out


def buckets_between(lo: int, hi: int, minimum: int = 16) -> list[int]:
    """Every `bucket` of a length in [lo, hi], ascending."""
    return sorted({bucket(n, minimum) for n in range(max(lo, 1), hi + 1)})
