"""Stage 4 of the data path: one utterance of one device, from ``listening`` to its final, in order."""
