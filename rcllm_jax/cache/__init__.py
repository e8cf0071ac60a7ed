"""Block KV caches: the device KV pool, block identity, item / user / prefix stores."""
