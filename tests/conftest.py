import os

# Tests never reach a model or dataset hub: everything they load is on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads otherwise spin and starve the other process on a shared 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# the package's progress lines reach stderr (where tests read them) in this process and in the ones it starts
# (torchrun workers: every rank), as they did when the package printed them; see rag.log
os.environ.setdefault("RAG_LOG_LEVEL", "info")
os.environ.setdefault("RAG_LOG_ALL_RANKS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny models run fastest on one thread (and CI shares its 2 cores with nothing else worth the overhead)
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every module runs on one thread and restores the count after (a CLI under test may change it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _rag_logging():
    """The ``rag`` logger's lines on stderr at info (``rag.log.configure_logging``, from the variables above)."""
    from rag.log import configure_logging

    configure_logging()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
