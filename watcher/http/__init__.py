"""The HTTP edge: the API, the event streams, metrics, and the client of the API."""
