"""Data: records -> token sequences -> deterministic, resumable batches.

``sources`` reads records (local files or hub data sets), ``tokenizer`` turns text into ids,
``chat_formats`` reads conversations, ``chat_template`` renders them, ``chat`` labels the
assistant turns, ``tasks`` makes training examples (causal LM, prompt -> completion, chat),
``packing`` joins documents into full blocks or whole examples into rows, ``batches`` orders them
resumably, and ``prepare`` puts it together for a training run.
"""

from .batches import Batches
from .config import TASKS, DataConfig
from .prepare import prepare_data, split_train_val
from .sources import FILE_TYPES, load_records
from .examples import IGNORE_INDEX, Encoded, Example
from .tasks import build_examples, encode_records
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Batches", "DataConfig", "Encoded", "Example", "FILE_TYPES", "IGNORE_INDEX", "TASKS", "Tokenizer",
           "build_examples", "encode_records", "load_records", "load_tokenizer", "prepare_data", "split_train_val"]
