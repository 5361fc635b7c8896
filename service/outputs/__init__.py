"""Stage 6 of the data path: what the bridge tells devices (their ``out/`` topics) and Home Assistant."""
