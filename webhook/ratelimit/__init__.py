"""Rate limits: RateLimitPolicy → Envoy's local and global rate-limit filters, and the global
rate-limit service (``sidemesh ratelimit``) with its counters in Redis."""
