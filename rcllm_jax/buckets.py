"""Shape buckets: a serving process compiles one program per bucket, never per request length."""


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest bucket >= max(n, minimum). Buckets: 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...
    (four per octave, multiples of 4): at most 25% padding, ~10% on average, and a bounded number
    of compiled programs (4 per doubling of the prompt length)."""
    n = max(n, minimum, 4)
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    step = max(1, p // 8)  # quarter steps between p/2 and p
    return -(-n // step) * step
