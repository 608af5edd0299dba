"""Token bucket; time passed in."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: int, now_ms: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now_ms

    def take(self, now_ms: int) -> int:
        """Take one token; return 0 on success, else milliseconds until one is available."""
        elapsed = max(0, now_ms - self.stamp) / 1000.0
        self.stamp = now_ms
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0
        return max(1, int((1.0 - self.tokens) / self.rate * 1000))
