"""Suite-wide settings. Without a GPU the Triton kernels run under Triton's interpreter, which must be
chosen before triton is first imported (TRITON_INTERPRET=1); on a GPU they compile for real."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
