"""Data: reading rows (jsonl, json, parquet, csv, a saved HF dataset directory, ``builtin:<task>``) with errors
that name the file and line (``io``), the column conventions of each recipe and their validation
(``formats``), tokenization with chat templates and prompt / completion masks (``tokenize``), and collation,
packing and epoch sampling (``collate``).

May import: tasks (the built-in generated data sets), config, runtime.
"""
