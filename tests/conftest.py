"""Suite-wide settings. Triton's interpreter must be chosen before triton is first imported, so the
kernel tests run on this CPU-only machine (TRITON_INTERPRET=1)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
