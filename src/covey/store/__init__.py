"""Content-addressed storage of adapter updates: CIDs, safetensors bytes, a local folder store."""
