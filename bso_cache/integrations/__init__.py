"""Bridges to other trainers (each imports its trainer only when used): `bso_cache.integrations.trl`."""
