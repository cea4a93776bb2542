"""Checkpoint files: Hugging Face model directories and GGUF files, and nothing else (it imports only
``runtime`` and ``errors``).

- ``resolve``: a name -> a local model directory (hub ids downloaded into the HF cache).
- ``files``: config.json, safetensors (single or sharded), pickles only with weights_only.
- ``export``: a model written as a complete Hugging Face model directory.
- ``gguf_file``: GGUF files read and checked (metadata, tensors dequantized by gguf-py or kept as blocks).
- ``gguf_write``: GGUF files written (gguf-py's writer and quantizers), complete or absent.
- ``gguf_tokenizer``: a GGUF's tokenizer metadata -> tokenizer.json + tokenizer_config.json (as transformers
  builds it).
- ``gguf_vocab``: a tokenizer directory -> a GGUF's tokenizer metadata (as llama.cpp's converter writes it).
"""
