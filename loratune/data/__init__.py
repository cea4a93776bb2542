"""Data: records -> token sequences -> deterministic, resumable batches.

- ``config``: :class:`DataConfig`, where the text comes from and how it becomes sequences.
- ``sources``: records from local files or hub data sets.
- ``jsonfiles``: a model directory's small JSON side files (tokenizer_config.json, generation_config.json).
- ``tokenizer``: text -> ids, read from a model directory as transformers reads it.
- ``chat_formats``: records -> conversations (messages, ShareGPT, Alpaca, templates).
- ``chat_template``: a model's chat template rendered as transformers renders it.
- ``template_sandbox``: the jinja2 sandbox the template runs in.
- ``template_bounds``: the render's bounds in time, size and nesting.
- ``chat``: conversations -> examples, loss on the assistant turns.
- ``examples``: :class:`Example`, ids and aligned labels.
- ``tasks``: records -> examples for causal_lm, completion and chat.
- ``packing``: sequence packing, documents into blocks or whole examples into rows.
- ``preference_formats``: TRL's preference, KTO and GRPO records, read and checked.
- ``preference_items``: those records as token ids (TRL's tokenizing and truncation) and their batches.
- ``batches``: deterministic, resumable batches.
- ``prepare``: the (train, validation) examples a run uses, put together.
"""

from .batches import Batches
from .config import TASKS, DataConfig
from .preference_items import ITEM_KINDS, PairItem, PromptItem, UnpairedItem, build_items, encode_items
from .prepare import KINDS, prepare_data, split_train_val
from .sources import FILE_TYPES, load_records
from .examples import IGNORE_INDEX, Encoded, Example
from .tasks import build_examples, encode_records
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Batches", "DataConfig", "Encoded", "Example", "FILE_TYPES", "IGNORE_INDEX", "ITEM_KINDS", "KINDS",
           "PairItem", "PromptItem", "TASKS", "Tokenizer", "UnpairedItem", "build_examples", "build_items",
           "encode_items", "encode_records", "load_records", "load_tokenizer", "prepare_data", "split_train_val"]
