"""`evaluate` modules shipped with cusa-hf, loadable offline with ``evaluate.load(<folder>)``; the metric functions
themselves live in ``cusa_hf.evaluation.metrics``."""

import os

#: Folder of the ``retrieval_recall`` module: ``evaluate.load(RETRIEVAL_RECALL_PATH)``.
RETRIEVAL_RECALL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retrieval_recall")
