"""Stage 1 of the data path: the broker connection (client from a URL, reconnects, the receive seam)."""
