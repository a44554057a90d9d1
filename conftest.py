"""Test setup for tests/ and the notebooks nbmake runs: offline, FAST, deterministic thread use."""
import os

# Offline and FAST everywhere, including the notebook kernels nbmake starts (they inherit this environment).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CALIBRL_FAST", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Under pytest-xdist each worker gets one thread, so two workers share the two cores without oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
