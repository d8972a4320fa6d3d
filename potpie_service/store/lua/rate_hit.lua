-- Count one request against each limit's window; returns per limit its count and the ms left in its window.
-- KEYS: one counter per limit.   a: windows_ms (one per key)
return hit_limits(KEYS, a.windows_ms)
