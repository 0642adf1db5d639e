"""SGR / SAF image-text similarity reasoners (Diao et al., "Similarity Reasoning and Filtration for Image-Text
Matching", AAAI 2021), with a vectorised, chunked and masked pairwise scorer.

The original scores one caption at a time in a Python loop. Here a chunk of captions is scored against all images at
once; padded words are masked wherever the original only ever saw real words (the word-axis normalisation of the
text-to-image attention, the text self-attention, the SGR edge softmax, the SAF gate normalisation and the SAF
BatchNorm statistics). Scores equal the per-caption computation in eval mode, and in train mode SAF's BatchNorm uses
per-caption statistics and per-caption running-stat updates, as the loop does (see ``SgrafAttentionFiltration``).

Submodule names (``img_enc``, ``txt_enc``, ``sim_enc`` and everything inside) follow the released checkpoints, so
converting one is a prefix join of its three state dicts (``convert.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_sgraf import SgrafConfig


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Divide by the L2 norm plus ``eps`` (the original's form: added to the norm, not clamped)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def l1norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Divide by the L1 norm plus ``eps``."""
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` is False gets weight 0 (every row must keep one True)."""
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=dim)


def lengths_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch,)` caption lengths from a right-padded `(batch, seq_len)` mask; rejects holes and empty captions."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] < lengths[:, None]):
        raise ValueError("attention_mask must be right-padded (ones, then zeros) in every row: SGRAF packs captions by length")
    if (lengths == 0).any():
        raise ValueError(f"captions {torch.nonzero(lengths == 0).flatten().tolist()} have no tokens")
    return lengths


def hinge_triplet_loss(
    scores: torch.Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SGRAF/VSE++ bidirectional hinge triplet loss, summed (not averaged) as in the original.

    Args:
        scores: `(batch, batch)` image-by-caption scores, ``scores[i, j] = s(image_i, caption_j)``, diagonal positive.
        margin: hinge margin.
        max_violation: keep only the hardest negative of each query; otherwise sum over all negatives.
        image_ids: `(batch,)` optional; pairs whose image ids match are not used as negatives (the original passes
            none, so other captions of the same image count as negatives).

    Returns:
        scalar: sum over images of the caption-retrieval hinge plus sum over captions of the image-retrieval hinge.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"hinge_triplet_loss needs a square (batch, batch) score matrix, got {tuple(scores.shape)}")
    positives = scores.diagonal()
    cost_captions = (margin + scores - positives[:, None]).clamp(min=0)  # per image row: its captions' negatives
    cost_images = (margin + scores - positives[None, :]).clamp(min=0)  # per caption column: its images' negatives
    not_negative = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    if image_ids is not None:
        not_negative = not_negative | (image_ids[:, None] == image_ids[None, :])
    cost_captions = cost_captions.masked_fill(not_negative, 0)
    cost_images = cost_images.masked_fill(not_negative, 0)
    if max_violation:
        return cost_captions.max(dim=1).values.sum() + cost_images.max(dim=0).values.sum()
    return cost_captions.sum() + cost_images.sum()


class SgrafImageEncoder(nn.Module):
    """Region features `(batch, num_regions, img_dim)` -> region embeddings `(batch, num_regions, embed_size)`."""

    def __init__(self, config: SgrafConfig):
        super().__init__()
        self.fc = nn.Linear(config.img_dim, config.embed_size)
        self.normalize = not config.no_imgnorm

    def forward(self, region_features: torch.Tensor) -> torch.Tensor:
        embeds = self.fc(region_features)
        return l2norm(embeds) if self.normalize else embeds


class SgrafTextEncoder(nn.Module):
    """Word ids `(batch, seq_len)` + lengths -> word embeddings `(batch, seq_len, embed_size)`, zero past each length.

    A bidirectional GRU's two directions are averaged. Lengths need not be sorted: packing sorts and unsorts, and
    each caption is encoded independently of the others.
    """

    def __init__(self, config: SgrafConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.cap_rnn = nn.GRU(
            config.word_dim, config.embed_size, config.num_layers, batch_first=True, bidirectional=config.bi_gru
        )
        self.bidirectional = config.bi_gru
        self.normalize = not config.no_txtnorm

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        word_vectors = self.dropout(self.embed(input_ids))
        packed = pack_padded_sequence(word_vectors, lengths.cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = pad_packed_sequence(self.cap_rnn(packed)[0], batch_first=True, total_length=input_ids.shape[1])
        if self.bidirectional:
            forward_half, backward_half = hidden.chunk(2, dim=-1)
            hidden = (forward_half + backward_half) / 2
        return l2norm(hidden) if self.normalize else hidden


class SgrafVisualSelfAttention(nn.Module):
    """Global image vector: region embeddings re-weighted by their agreement with the region mean.

    The local branch's BatchNorm has one channel per *region index* (statistics over batch x embed_size), as in the
    original, which ties the model to ``num_regions``.
    """

    def __init__(self, config: SgrafConfig):
        super().__init__()
        size = config.embed_size
        self.embedding_local = nn.Sequential(
            nn.Linear(size, size), nn.BatchNorm1d(config.num_regions), nn.Tanh(), nn.Dropout(config.dropout)
        )
        self.embedding_global = nn.Sequential(
            nn.Linear(size, size), nn.BatchNorm1d(size), nn.Tanh(), nn.Dropout(config.dropout)
        )
        self.embedding_common = nn.Sequential(nn.Linear(size, 1))

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """`(batch, num_regions, embed_size)` -> `(batch, embed_size)`, unit L2 norm."""
        local = self.embedding_local(regions)
        context = self.embedding_global(regions.mean(dim=1))
        weights = self.embedding_common(local * context[:, None, :]).squeeze(-1).softmax(dim=-1)
        return l2norm((weights[..., None] * regions).sum(dim=1))


class SgrafTextSelfAttention(nn.Module):
    """Global caption vector: word embeddings re-weighted by their agreement with the (masked) word mean."""

    def __init__(self, config: SgrafConfig):
        super().__init__()
        size = config.embed_size
        self.embedding_local = nn.Sequential(nn.Linear(size, size), nn.Tanh(), nn.Dropout(config.dropout))
        self.embedding_global = nn.Sequential(nn.Linear(size, size), nn.Tanh(), nn.Dropout(config.dropout))
        self.embedding_common = nn.Sequential(nn.Linear(size, 1))

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """`(batch, seq_len, embed_size)` + bool mask `(batch, seq_len)` -> `(batch, embed_size)`, unit L2 norm."""
        mean = (words * word_mask[..., None]).sum(dim=1) / word_mask.sum(dim=1, keepdim=True)
        local = self.embedding_local(words)
        context = self.embedding_global(mean)
        scores = self.embedding_common(local * context[:, None, :]).squeeze(-1)
        weights = masked_softmax(scores, word_mask)
        return l2norm((weights[..., None] * words).sum(dim=1))


class SgrafGraphReasoning(nn.Module):
    """One SGR step over the similarity graph: ``x <- ReLU(W_g softmax(W_q x (W_k x)^T) x)``, padded nodes masked
    out of the key axis so they never reach a real node."""

    def __init__(self, config: SgrafConfig):
        super().__init__()
        self.graph_query_w = nn.Linear(config.sim_dim, config.sim_dim)
        self.graph_key_w = nn.Linear(config.sim_dim, config.sim_dim)
        self.sim_graph_w = nn.Linear(config.sim_dim, config.sim_dim)

    def forward(self, nodes: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """`(n_images, n_captions, n_nodes, sim_dim)`, bool `(n_captions, n_nodes)` -> same shape as ``nodes``."""
        edges = self.graph_query_w(nodes) @ self.graph_key_w(nodes).transpose(-1, -2)
        edges = masked_softmax(edges, node_mask[None, :, None, :])
        return F.relu(self.sim_graph_w(edges @ nodes))


class SgrafAttentionFiltration(nn.Module):
    """SAF: sigmoid gates (through a one-channel BatchNorm) select the informative alignments, L1-normalised.

    Train-mode BatchNorm, exactly as the per-caption original: the original applies ``bn`` once per caption, so the
    batch statistics are those of one caption (all images x its real nodes), and the running statistics get one
    momentum update per caption, in caption order. Here both are computed for all captions of a chunk at once (the
    running-stat updates in closed form). Eval mode uses the running statistics, so a fused call equals the loop.
    """

    def __init__(self, config: SgrafConfig):
        super().__init__()
        self.attn_sim_w = nn.Linear(config.sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)

    def _per_caption_batch_norm(self, gate_logits: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        valid = node_mask[None].expand_as(gate_logits)
        counts = valid.sum(dim=(0, 2)).to(gate_logits.dtype)  # (n_captions,) = n_images * (n_words + 1)
        means = (gate_logits * valid).sum(dim=(0, 2)) / counts
        centred = gate_logits - means[None, :, None]
        variances = (centred.pow(2) * valid).sum(dim=(0, 2)) / counts  # biased, as BatchNorm normalises
        normed = centred / torch.sqrt(variances[None, :, None] + bn.eps) * bn.weight + bn.bias
        with torch.no_grad():
            # n sequential updates r <- (1 - m) r + m v_j, j = 0..n-1, collapse to
            # r <- (1 - m)^n r + sum_j m (1 - m)^(n - 1 - j) v_j.
            n, m = means.shape[0], bn.momentum
            keep = (1 - m) ** torch.arange(n - 1, -1, -1, device=means.device, dtype=means.dtype)
            unbiased = variances * counts / (counts - 1)
            bn.running_mean.mul_((1 - m) ** n).add_(m * (keep * means).sum())
            bn.running_var.mul_((1 - m) ** n).add_(m * (keep * unbiased).sum())
            bn.num_batches_tracked.add_(n)
        return normed

    def forward(self, nodes: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """`(n_images, n_captions, n_nodes, sim_dim)`, bool `(n_captions, n_nodes)` -> `(n_images, n_captions,
        sim_dim)`, unit L2 norm."""
        gate_logits = self.attn_sim_w(nodes).squeeze(-1)
        if self.bn.training:
            normed = self._per_caption_batch_norm(gate_logits, node_mask)
        else:
            normed = self.bn(gate_logits.reshape(-1, 1)).view_as(gate_logits)
        gates = l1norm(torch.sigmoid(normed) * node_mask[None], dim=-1)
        return l2norm((gates[..., None] * nodes).sum(dim=-2))


class SgrafSimilarity(nn.Module):
    """Image-caption similarity: global + local alignment vectors, reasoned by SGR or filtered by SAF, then scored.

    The text-to-image attention of SCAN (``attn_smooth``-sharpened softmax over regions of the LeakyReLU'd,
    word-axis-L2-normalised word-region cosines) gives each word an attended image context; each node of the
    similarity graph is the ``sim_dim`` projection of a squared difference (node 0: global vectors; node 1..n: each
    word with its context).
    """

    def __init__(self, config: SgrafConfig):
        super().__init__()
        self.v_global_w = SgrafVisualSelfAttention(config)
        self.t_global_w = SgrafTextSelfAttention(config)
        self.sim_tranloc_w = nn.Linear(config.embed_size, config.sim_dim)
        self.sim_tranglo_w = nn.Linear(config.embed_size, config.sim_dim)
        self.sim_eval_w = nn.Linear(config.sim_dim, 1)
        self.module_name = config.module_name
        if config.module_name == "SGR":
            self.SGR_module = nn.ModuleList([SgrafGraphReasoning(config) for _ in range(config.sgr_step)])
        else:
            self.SAF_module = SgrafAttentionFiltration(config)
        self.attn_smooth = config.attn_smooth
        self.caption_chunk_size = config.caption_chunk_size

    def _attended_regions(self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """`(n_images, R, E)`, `(n_captions, L, E)` -> each word's attended image context `(n_images, n_captions, L, E)`."""
        attention = F.leaky_relu(torch.einsum("ire,cle->icrl", regions, words), negative_slope=0.1)
        # The original normalises over the real words of one caption; zeroing pads keeps them out of the norm.
        attention = l2norm(attention * word_mask[None, :, None, :], dim=-1)
        attention = (attention * self.attn_smooth).softmax(dim=2)  # over regions
        return l2norm(torch.einsum("icrl,ire->icle", attention, regions))

    def _score_chunk(self, regions, image_global, words, word_mask, text_global) -> torch.Tensor:
        """:meth:`forward` for one chunk of captions."""
        context = self._attended_regions(regions, words, word_mask)
        local = l2norm(self.sim_tranloc_w((context - words[None]).pow(2)))  # (I, C, L, S)
        glob = l2norm(self.sim_tranglo_w((image_global[:, None] - text_global[None]).pow(2)))  # (I, C, S)
        nodes = torch.cat([glob[:, :, None], local], dim=2)
        node_mask = torch.cat([word_mask.new_ones(word_mask.shape[0], 1), word_mask], dim=1)
        if self.module_name == "SGR":
            for layer in self.SGR_module:
                nodes = layer(nodes, node_mask)
            vector = nodes[:, :, 0]
        else:
            vector = self.SAF_module(nodes, node_mask)
        return self.sim_eval_w(vector).squeeze(-1)

    def forward(
        self,
        regions: torch.Tensor,
        image_global: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        text_global: torch.Tensor,
    ) -> torch.Tensor:
        """Pre-sigmoid scores `(n_images, n_captions)` of every image against every caption.

        Args:
            regions: `(n_images, num_regions, embed_size)` region embeddings.
            image_global: `(n_images, embed_size)` visual self-attention globals.
            words: `(n_captions, seq_len, embed_size)` word embeddings.
            word_mask: `(n_captions, seq_len)` bool, True on real words.
            text_global: `(n_captions, embed_size)` text self-attention globals.
        """
        columns = []
        for start in range(0, words.shape[0], self.caption_chunk_size):
            chunk = slice(start, start + self.caption_chunk_size)
            width = int(word_mask[chunk].sum(dim=1).max())  # drop columns that are padding for the whole chunk
            columns.append(
                self._score_chunk(
                    regions, image_global, words[chunk, :width], word_mask[chunk, :width], text_global[chunk]
                )
            )
        return torch.cat(columns, dim=1)


@dataclass
class SgrafOutput(ModelOutput):
    """Output of [`SgrafModel`] on a batch of aligned (image, caption) pairs.

    Args:
        loss: scalar hinge triplet loss (when ``return_loss``).
        sims: `(n_images, n_captions)` scores in (0, 1); ``sims[i, j] = s(image_i, caption_j)``, diagonal positive.
        sim_logits: `(n_images, n_captions)` the same before the sigmoid.
        image_embeds: `(n_images, num_regions, embed_size)` region embeddings.
        text_embeds: `(n_captions, seq_len, embed_size)` word embeddings, zero on padding.
        image_global: `(n_images, embed_size)` visual self-attention globals (unit norm).
        text_global: `(n_captions, embed_size)` text self-attention globals (unit norm).
    """

    loss: torch.Tensor | None = None
    sims: torch.Tensor | None = None
    sim_logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_global: torch.Tensor | None = None
    text_global: torch.Tensor | None = None


class SgrafPreTrainedModel(PreTrainedModel):
    config_class = SgrafConfig
    base_model_prefix = "sgraf"
    main_input_name = "region_features"

    def _init_weights(self, module):
        """The original's initialisation: Xavier-uniform linears with zero bias, U(-0.1, 0.1) word embeddings, unit
        BatchNorm, and PyTorch's default U(-1/sqrt(hidden), 1/sqrt(hidden)) for the GRU."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -0.1, 0.1)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.GRU):
            bound = module.hidden_size**-0.5
            for parameter in module.parameters():
                init.uniform_(parameter, -bound, bound)


class SgrafModel(SgrafPreTrainedModel):
    """SGR or SAF (``config.module_name``) over precomputed region features and word ids.

    Inputs: ``region_features`` `(n_images, num_regions, img_dim)` float; ``input_ids`` `(n_captions, seq_len)` word
    ids ``<start> w_1 .. w_n <end>``, right-padded with ``<pad>`` = 0; ``attention_mask`` `(n_captions, seq_len)`
    (optional: defaults to ``input_ids != pad_token_id``). The caption lengths are the mask's row sums.
    """

    def __init__(self, config: SgrafConfig):
        super().__init__(config)
        self.img_enc = SgrafImageEncoder(config)
        self.txt_enc = SgrafTextEncoder(config)
        self.sim_enc = SgrafSimilarity(config)
        self.post_init()

    def _check_regions(self, region_features: torch.Tensor) -> None:
        expected = (self.config.num_regions, self.config.img_dim)
        if region_features.dim() != 3 or tuple(region_features.shape[1:]) != expected:
            raise ValueError(
                f"region_features must have shape (batch, {expected[0]}, {expected[1]}) for this config "
                f"(num_regions, img_dim), got {tuple(region_features.shape)}"
            )

    def text_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bool `(n_captions, seq_len)` real-word mask (validated to be right-padded and non-empty)."""
        if attention_mask is None:
            if self.config.pad_token_id is None:
                raise ValueError("attention_mask is required when config.pad_token_id is None")
            attention_mask = input_ids != self.config.pad_token_id
        lengths = lengths_from_attention_mask(attention_mask)
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]

    def encode_image(self, region_features: torch.Tensor) -> torch.Tensor:
        """`(n, num_regions, img_dim)` -> region embeddings `(n, num_regions, embed_size)`."""
        self._check_regions(region_features)
        return self.img_enc(region_features)

    def encode_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """`(n, seq_len)` ids + bool mask -> word embeddings `(n, seq_len, embed_size)`, zero on padding."""
        return self.txt_enc(input_ids, text_mask.sum(dim=1))

    def image_global(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Visual self-attention globals `(n, embed_size)` of region embeddings."""
        return self.sim_enc.v_global_w(image_embeds)

    def text_global(self, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Text self-attention globals `(n, embed_size)` of word embeddings."""
        return self.sim_enc.t_global_w(text_embeds, text_mask)

    def forward(
        self,
        region_features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
    ) -> SgrafOutput:
        """Score every image against every caption; with ``return_loss`` the batch must be aligned pairs
        (image k with caption k) and the hinge triplet loss of the score matrix is returned."""
        text_mask = self.text_mask(input_ids, attention_mask)
        image_embeds = self.encode_image(region_features)
        text_embeds = self.encode_text(input_ids, text_mask)
        image_global = self.image_global(image_embeds)
        text_global = self.text_global(text_embeds, text_mask)
        sim_logits = self.sim_enc(image_embeds, image_global, text_embeds, text_mask, text_global)
        sims = torch.sigmoid(sim_logits)
        loss = None
        if return_loss:
            loss = hinge_triplet_loss(
                sims,
                self.config.margin,
                self.config.max_violation,
                image_ids if self.config.mask_same_image_negatives else None,
            )
        return SgrafOutput(
            loss=loss,
            sims=sims,
            sim_logits=sim_logits,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            image_global=image_global,
            text_global=text_global,
        )


class SgrafEnsemble(nn.Module):
    """SGRAF: the element-wise mean of the (sigmoid) score matrices of separately trained models (an SGR and an SAF).

    Not a trained module: the authors average the saved test similarity matrices of the two runs.
    """

    def __init__(self, models: list[SgrafModel]):
        super().__init__()
        if len(models) < 2:
            raise ValueError(f"SgrafEnsemble needs at least two models, got {len(models)}")
        self.members = nn.ModuleList(models)

    @classmethod
    def from_pretrained(cls, paths: list[str], **kwargs) -> "SgrafEnsemble":
        return cls([SgrafModel.from_pretrained(path, **kwargs) for path in paths])

    def forward(
        self, region_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(n_images, n_captions)` mean of the members' scores in (0, 1)."""
        return torch.stack(
            [member(region_features, input_ids, attention_mask).sims for member in self.members]
        ).mean(dim=0)
