"""Stage 3 of the data path: VAD engines score 32 ms windows; EchoKit's endpointer turns scores into turns."""
