"""A hostile adapter corpus: adapters and store trees an attacker could hand Quiver, built by code at test time."""
