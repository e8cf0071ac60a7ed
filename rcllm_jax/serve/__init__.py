"""Serving: the affinity scheduler, the engine loop and the HTTP front end (launch/serve.py)."""
