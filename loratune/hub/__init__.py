"""Hugging Face model files: resolving names (``resolve``), reading checkpoints (``files``), writing
exported models (``export``), and directories that are complete or absent (``fsutil``)."""
