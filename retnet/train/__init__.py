"""Training RetNet language models: ``torchrun -m retnet.train --config tiny`` (see ``__main__``)."""

from retnet.train.config import JobConfig, load_config

__all__ = ["JobConfig", "load_config"]
