"""Pure-PyTorch core of the speech-LLM pipeline (no Lightning imports here)."""
