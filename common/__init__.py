"""What every part of Quiver shares and nothing else: domain errors, the base model's fingerprint, where a base
checkpoint comes from and how it is quantized. It imports no other Quiver package, so `adapters/`, `training/`
and `server/` can all depend on it while `adapters/` and `training/` never depend on `server/`."""
