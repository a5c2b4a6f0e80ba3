"""Feedback data, the layer beneath dataloader.py and feedback_datasets.py: `examples` (Example, Dataset, Message),
`sources` (hub datasets, mirrors, local files), `rows` (TRL-style rows of any named source), `prompt_format` (prefix
strings or chat templates), `tokenization` (token ids, truncation, collation), `items` (what loaders flatten
examples into), `mixing` (datasets mixed by ratio), `report` (the start-of-run data table)."""
