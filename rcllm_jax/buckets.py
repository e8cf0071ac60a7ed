"""Shape buckets: a serving process compiles one program per bucket, never per request length."""


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest of {2^k, 3 * 2^(k-1)} >= max(n, minimum): at most 33% padding, two buckets per octave."""
    n = max(n, minimum)
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return 3 * p // 4 if 3 * p // 4 >= n and p >= 4 else p
