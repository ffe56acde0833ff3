"""Adapter store and validation (PEFT on-disk format plus Quiver metadata)."""
