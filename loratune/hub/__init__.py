"""Hugging Face model files, and nothing else (it imports only ``runtime`` and ``errors``).

- ``resolve``: a name -> a local model directory (hub ids downloaded into the HF cache).
- ``files``: config.json, safetensors (single or sharded), pickles only with weights_only.
- ``export``: a model written as a complete Hugging Face model directory.
"""
