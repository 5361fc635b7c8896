"""Command-line tools beside the running service: the device simulator, ``tail``, a private broker."""
