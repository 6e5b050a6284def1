"""Data stage: raw instruction data -> unified JSONL -> tokenized examples."""
