"""What training raises when it meets a NaN or infinite value that no check could see before training: a stream's rows
are checked as the collator builds batches, and a step whose gradients are not finite is stopped by ``CusaTrainer``;
both raise :class:`NonFiniteTrainingError`. (The checks ``CusaTrainer`` runs once when it is built are its own, with
the training split's preparation in ``cusa_hf.teachers.training_split``.)"""

from __future__ import annotations


class NonFiniteTrainingError(FloatingPointError):
    """Training met a NaN or infinite value: a training row's features (named by the message) or a step's gradients.
    ``CusaTrainer`` stops before the update and keeps the weights of the last finite step (the message says where).

    ``every_process``: every process of a distributed run raises it at the same step (the gradients are all-reduced),
    so they can save together; a row's error is raised only by the process that read the row."""

    def __init__(self, message: str, every_process: bool = False):
        super().__init__(message)
        self.every_process = every_process
