"""Fault injection: real processes, real signals, real Redis restarts; each module breaks one thing."""
