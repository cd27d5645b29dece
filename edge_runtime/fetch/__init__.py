"""Fetch: what should serve (desired state) and the verified, resumable, cached download of it."""
