"""Export: a model or an adapter in the formats other runtimes read (``loratune export``).

- ``gguf_model``: a whole model (the base, or the base with adapters merged) as one GGUF file llama.cpp
  runs, in a float type, a gguf-py quantization or (through llama.cpp's quantizer) a K-quant.
- ``gguf_lora``: a LoRA adapter as a LoRA GGUF, as llama.cpp's ``convert_lora_to_gguf.py`` writes it.
- ``modelfile``: the Ollama ``Modelfile`` beside a GGUF: FROM, the chat template as a Go template, stops.
"""
