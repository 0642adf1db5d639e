"""The ``retrieval_recall`` evaluate module (load its folder with ``evaluate.load``)."""
