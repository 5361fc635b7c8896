"""Stage 2 of the data path: device messages routed, validated and limited; each device's frames reassembled."""
