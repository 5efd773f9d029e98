"""The model leaves murmur: a checkpoint's weights as a Hugging Face folder (`hf.py`, `hf_tokenizer.py`), and
text from them without any other library (`sampling.py`). `source.py` reads what both start from.

This layer sits above `peer/lab` (it reads checkpoints the way `murmur eval` does) and below `peer/cli`.
"""
