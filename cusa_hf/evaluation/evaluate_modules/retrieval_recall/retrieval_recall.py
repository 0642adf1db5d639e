"""Image-text retrieval recall (COCO / Flickr30K protocol) as an `evaluate` metric module."""

import datasets
import evaluate
import numpy as np

from cusa_hf.evaluation.metrics import retrieval_metrics

_DESCRIPTION = """
Image-text retrieval R@1/5/10 in both directions and RSUM (percent), the COCO 5K / Flickr30K 1K protocol: an image
query is answered when any of its captions ranks within the top K, a caption query when its image does.

Each example is one caption: `predictions` is its row of scores against every image of the split (the same number
of images for every caption) and `references` is the index of its own image. Add captions in any batches; the
metric stacks them into the (n_images, n_texts) matrix. Every image must have at least one caption.
Ties are pessimistic by default (a positive ranks after equal-scored items); pass ties="optimistic" to compute().
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of per-caption score lists, each of length n_images.
    references: list of image indices (int), one per caption.
    ties: "pessimistic" (default) or "optimistic".
    chunk_size: rows of the score matrix processed at once (default: automatic).
Returns:
    i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, rsum (floats, percent).
Example:
    >>> import evaluate
    >>> from cusa_hf.evaluation.evaluate_modules import RETRIEVAL_RECALL_PATH
    >>> recall = evaluate.load(RETRIEVAL_RECALL_PATH)
    >>> recall.compute(predictions=[[0.9, 0.2], [0.8, 0.3], [0.1, 0.7]], references=[0, 0, 1])["rsum"]
    600.0
"""

_CITATION = """
@inproceedings{huang2024cusa,
  title={Cross-Modal and Uni-Modal Soft-Label Alignment for Image-Text Retrieval},
  author={Huang, Hailang and Nie, Zhijie and Wang, Ziqiao and Shang, Ziyu},
  booktitle={AAAI},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, ties="pessimistic", chunk_size=None):
        lengths = {len(row) for row in predictions}
        if len(lengths) != 1:
            raise ValueError(f"every caption needs scores for the same images; got score rows of lengths {sorted(lengths)}")
        scores_per_text = np.asarray(predictions, dtype=np.float32)  # (n_texts, n_images)
        return retrieval_metrics(scores_per_text.T, np.asarray(references), chunk_size=chunk_size, ties=ties)
