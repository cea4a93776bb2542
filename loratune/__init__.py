"""loratune: LoRA fine-tuning of causal language models, from Hugging Face files to an OpenAI-compatible server.

The packages and flat modules, top to bottom: each imports only from those below it
(tests/test_imports.py checks it, and lists the layers).

- ``__main__``: ``python -m loratune``, the command line.
- ``cli``: one module per command.
- ``train``: one training session, its loop and step; ``serve``: many adapters on one base over HTTP;
  ``export``: a model or adapter as GGUF (llama.cpp, Ollama), Hugging Face or PEFT files.
- ``recipe``: the typed training recipe, read from YAML and ``--set``.
- ``dist``: several processes (torchrun); ``generate``: sampling with the KV cache; ``merge``: adapters
  folded into the base weights (``loratune merge``, QLoRA's into the base it was trained against).
- ``data``: records -> examples -> batches.
- ``quant``: the frozen base in fewer bits (QLoRA).
- ``adapters``: LoRA and its variants, and the PEFT format.
- ``models``: the model families, one file and one spec each.
- ``hub``: Hugging Face files: resolve, read, export.
- ``runtime``: what every stage shares at run time (devices, seeds, finite weights, output directories,
  complete-or-absent writes); ``bounded_yaml``: YAML with safe types and bounded aliases.
- ``errors``: the one family of user-facing errors.
"""
