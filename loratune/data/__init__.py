"""Data: records -> token sequences -> deterministic, resumable batches.

``sources`` reads records (local files or hub data sets), ``tokenizer`` turns text into ids,
``tasks`` makes training examples (causal LM, prompt -> completion with the prompt masked),
``packing`` joins documents into full blocks, ``batches`` orders them resumably, and
``prepare`` puts it together for a training run.
"""

from .batches import Batches
from .config import TASKS, DataConfig
from .prepare import prepare_data, split_train_val
from .sources import FILE_TYPES, load_records
from .tasks import IGNORE_INDEX, Example, build_examples
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Batches", "DataConfig", "Example", "FILE_TYPES", "IGNORE_INDEX", "TASKS", "Tokenizer", "build_examples",
           "load_records", "load_tokenizer", "prepare_data", "split_train_val"]
