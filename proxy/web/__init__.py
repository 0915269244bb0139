"""HTTP edge: thin aiohttp handlers around the pure modules."""
