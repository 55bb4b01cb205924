"""Data in: the procedurally generated POPE-like shapes task (and its shifts), and the POPE/VQA JSONL loader."""
