"""The speed work."""
