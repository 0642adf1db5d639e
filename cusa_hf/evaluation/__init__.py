"""Evaluation of image-text retrieval models: R@K / RSUM, ITM reranking, ECCV Caption, uni-modal metrics, encoding.

Protocols (each matches the definition the CUSA paper reports; see ``docs/evaluation.md``):

* **COCO 5K / Flickr30K 1K R@K** (:func:`retrieval_metrics`, module ``metrics``): image-to-text rank = best rank
  among all the image's captions, text-to-image rank = rank of the caption's one image; R@K = percentage of queries
  with rank < K; RSUM = sum of the six recalls. Ties are pessimistic by default.
* **Fusion reranking** (:func:`rerank_with_itm`, module ``reranking``): the X2VLM/BLIP protocol, dual-encoder top-k
  then ITM rescoring; :func:`pairwise_similarity` fills the matrix of backbones that score pairs themselves (SGRAF).
* **ECCV Caption** (:func:`eccv_metrics`, module ``eccv``): mAP@R, R-Precision and R@1 with the extended positives of
  Chun et al. 2022.
* **Uni-modal** (module ``unimodal``): image retrieval R@1 (:func:`image_retrieval_r1`) by leave-one-out or
  query -> gallery nearest neighbour, and STS Spearman (:func:`sts_spearman`); their data loaders are in ``loaders``.

``encoding`` runs a model over a split (:func:`encode_images`, :func:`encode_texts`, :func:`evaluate_retrieval`,
:func:`evaluate_sts`, :func:`evaluate_image_retrieval`). Evaluators are objects (``evaluator``: the
:class:`Evaluator` contract, :class:`SequentialEvaluator`, :class:`RetrievalEvaluator`, the reusable per-split object
that ``CusaTrainer.evaluate`` calls by default; ``eccv_evaluator``, ``unimodal_evaluators``); ``metric_registry`` says
what each metric key means, ``eval_view`` holds a split's unique images and captions, and ``evaluate_modules`` the
``evaluate`` module.

Import each name from its module (``from cusa_hf.evaluation.metrics import retrieval_metrics``); the package itself
defines nothing. The reranking configuration the adapters return, ``RerankConfig``, lives in ``cusa_hf.backbones``.
"""
