"""`evaluate` metric modules shipped with cusa-hf, loadable offline with ``evaluate.load(<path>)``."""

import os

#: Folder of the ``retrieval_recall`` metric: ``evaluate.load(RETRIEVAL_RECALL_PATH)``.
RETRIEVAL_RECALL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retrieval_recall")

__all__ = ["RETRIEVAL_RECALL_PATH"]
