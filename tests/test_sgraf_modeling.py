"""SGR / SAF native model: shapes, the vectorised scorer against a per-caption reference, masking, loss, training."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from cusa_hf.models.sgraf.configuration_sgraf import SgrafConfig
from cusa_hf.models.sgraf.modeling_sgraf import SgrafEnsemble, SgrafModel, hinge_triplet_loss
from cusa_hf.models.sgraf.modeling_sgraf import l1norm, l2norm

MODULES = ["SGR", "SAF"]


def tiny_config(module_name="SGR", **overrides):
    fields = dict(
        vocab_size=20, word_dim=8, embed_size=16, img_dim=12, num_regions=4, sim_dim=8, sgr_step=2,
        module_name=module_name, caption_chunk_size=2,
    )
    fields.update(overrides)
    return SgrafConfig(**fields)


def tiny_batch(seed=0, lengths=(5, 3, 2)):
    """Region features (B, 4, 12) and right-padded word ids <start> .. <end> with the given lengths (unsorted ok)."""
    generator = torch.Generator().manual_seed(seed)
    regions = torch.randn(len(lengths), 4, 12, generator=generator)
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = 1
        input_ids[row, 1 : length - 1] = torch.randint(4, 20, (length - 2,), generator=generator)
        input_ids[row, length - 1] = 2
    return regions, input_ids


def reference_sims(model: SgrafModel, regions: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The original algorithm: every caption encoded alone and scored against all images one caption at a time,
    on unpadded words only (no masks), calling SAF's BatchNorm once per caption."""
    sim = model.sim_enc
    image_embeds = model.img_enc(regions)
    image_global = sim.v_global_w(image_embeds)
    lengths = (input_ids != 0).sum(dim=1)
    columns = []
    for row, length in enumerate(lengths.tolist()):
        words = model.txt_enc(input_ids[row : row + 1, :length], torch.tensor([length]))  # (1, n, E)
        local = sim.t_global_w.embedding_local(words)
        context = sim.t_global_w.embedding_global(words.mean(dim=1))
        weights = torch.softmax(sim.t_global_w.embedding_common(local * context[:, None]).squeeze(-1), dim=1)
        text_global = l2norm((weights[..., None] * words).sum(dim=1))

        expanded = words.repeat(len(regions), 1, 1)  # (I, n, E)
        attention = nn.functional.leaky_relu(torch.bmm(image_embeds, expanded.transpose(1, 2)), 0.1)  # (I, R, n)
        attention = torch.softmax(l2norm(attention, dim=2).transpose(1, 2) * sim.attn_smooth, dim=2)  # (I, n, R)
        context_regions = l2norm(torch.bmm(attention, image_embeds))
        local_sim = l2norm(sim.sim_tranloc_w((context_regions - expanded).pow(2)))
        global_sim = l2norm(sim.sim_tranglo_w((image_global - text_global).pow(2)))
        nodes = torch.cat([global_sim[:, None], local_sim], dim=1)
        if model.config.module_name == "SGR":
            for layer in sim.SGR_module:
                edges = torch.softmax(
                    torch.bmm(layer.graph_query_w(nodes), layer.graph_key_w(nodes).transpose(1, 2)), dim=-1
                )
                nodes = torch.relu(layer.sim_graph_w(torch.bmm(edges, nodes)))
            vector = nodes[:, 0]
        else:
            saf = sim.SAF_module
            gates = l1norm(torch.sigmoid(saf.bn(saf.attn_sim_w(nodes).permute(0, 2, 1))), dim=-1)
            vector = l2norm(torch.matmul(gates, nodes).squeeze(1))
        columns.append(torch.sigmoid(sim.sim_eval_w(vector)))
    return torch.cat(columns, dim=1)


@pytest.mark.parametrize("module_name", MODULES)
def test_shapes_and_norms(module_name):
    model = SgrafModel(tiny_config(module_name)).eval()
    regions, input_ids = tiny_batch()
    with torch.no_grad():
        out = model(regions, input_ids)
    assert out.sims.shape == out.sim_logits.shape == (3, 3)
    assert ((out.sims > 0) & (out.sims < 1)).all()
    torch.testing.assert_close(out.sims, torch.sigmoid(out.sim_logits))
    assert out.image_embeds.shape == (3, 4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3, 4))
    assert out.text_embeds.shape == (3, 5, 16)
    mask = input_ids != 0
    torch.testing.assert_close(out.text_embeds.norm(dim=-1)[mask], torch.ones(int(mask.sum())))
    assert (out.text_embeds[~mask] == 0).all()
    for glob in (out.image_global, out.text_global):
        assert glob.shape == (3, 16)
        torch.testing.assert_close(glob.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("module_name", MODULES)
@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_vectorised_equals_per_caption_reference(module_name, chunk):
    model = SgrafModel(tiny_config(module_name, caption_chunk_size=chunk)).eval()
    regions, input_ids = tiny_batch(seed=1, lengths=(4, 7, 3, 6))
    with torch.no_grad():
        fused = model(regions[:3], input_ids).sims
        expected = reference_sims(model, regions[:3], input_ids)
    assert fused.shape == (3, 4)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("module_name", MODULES)
def test_pair_in_batch_equals_pair_alone_and_padding_is_ignored(module_name):
    model = SgrafModel(tiny_config(module_name)).eval()
    regions, input_ids = tiny_batch(seed=2, lengths=(3, 6, 4))
    with torch.no_grad():
        batch_sims = model(regions, input_ids).sims
        for i in range(3):
            for j in range(3):
                length = int((input_ids[j] != 0).sum())
                alone = model(regions[i : i + 1], input_ids[j : j + 1, :length]).sims
                torch.testing.assert_close(alone[0, 0], batch_sims[i, j], atol=1e-6, rtol=0)
        padded = torch.cat([input_ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model(regions, padded).sims, batch_sims, atol=1e-6, rtol=0)
        order = torch.tensor([1, 2, 0])  # sorted by length, descending, as the original collate does
        resorted = model(regions, input_ids[order]).sims
        torch.testing.assert_close(resorted, batch_sims[:, order], atol=1e-6, rtol=0)


def test_saf_train_mode_batch_norm_is_per_caption():
    """Train mode, dropout off: the fused SAF gives the loop's scores and the loop's BatchNorm running stats."""
    model = SgrafModel(tiny_config("SAF", dropout=0.0, caption_chunk_size=2)).train()
    reference = copy.deepcopy(model)
    regions, input_ids = tiny_batch(seed=3, lengths=(5, 3, 4))
    for step in range(2):  # the second step starts from updated running stats
        fused = model(regions, input_ids).sims
        expected = reference_sims(reference, regions, input_ids)
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
    bn, reference_bn = model.sim_enc.SAF_module.bn, reference.sim_enc.SAF_module.bn
    assert int(bn.num_batches_tracked) == int(reference_bn.num_batches_tracked) == 6
    torch.testing.assert_close(bn.running_mean, reference_bn.running_mean)
    torch.testing.assert_close(bn.running_var, reference_bn.running_var)
    assert not torch.equal(bn.running_var, torch.ones(1))


def test_hinge_loss_on_hand_made_matrix():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.6, 0.3], [0.2, 0.7, 0.4]])
    # caption retrieval violations: (1,0) 0.4, (2,1) 0.5; image retrieval: (1,0) 0.1, (0,1) 0.1, (2,1) 0.3, (1,2) 0.1
    torch.testing.assert_close(hinge_triplet_loss(scores, 0.2, max_violation=False), torch.tensor(1.5))
    torch.testing.assert_close(hinge_triplet_loss(scores, 0.2, max_violation=True), torch.tensor(1.4))
    # pairs (0,1) and (1,0) are no longer negatives: left are (2,1) 0.5 for captions, (2,1) 0.3 and (1,2) 0.1 for images
    same_image = torch.tensor([7, 7, 8])
    torch.testing.assert_close(hinge_triplet_loss(scores, 0.2, False, image_ids=same_image), torch.tensor(0.9))
    torch.testing.assert_close(hinge_triplet_loss(scores, 0.2, True, image_ids=same_image), torch.tensor(0.9))
    with pytest.raises(ValueError, match="square"):
        hinge_triplet_loss(scores[:2])


def test_model_loss_uses_config_and_image_ids():
    config = tiny_config("SGR", max_violation=False, margin=0.5, mask_same_image_negatives=True)
    model = SgrafModel(config).eval()
    regions, input_ids = tiny_batch()
    image_ids = torch.tensor([0, 0, 1])
    out = model(regions, input_ids, image_ids=image_ids, return_loss=True)
    torch.testing.assert_close(out.loss, hinge_triplet_loss(out.sims, 0.5, False, image_ids))


@pytest.mark.parametrize("module_name", MODULES)
def test_gradients_reach_every_parameter(module_name):
    model = SgrafModel(tiny_config(module_name)).train()
    regions, input_ids = tiny_batch(lengths=(5, 3, 2, 4))
    model(regions, input_ids, return_loss=True).loss.backward()
    # A bias added to every self-attention score is invisible to the softmax, and SAF's gate bias to the batch norm that
    # centres the gates in training: their gradients are zero by construction (up to rounding, which may leave an
    # exact 0 for some initialisations).
    shift_invariant = {"sim_enc.v_global_w.embedding_common.0.bias", "sim_enc.t_global_w.embedding_common.0.bias",
                       "sim_enc.SAF_module.attn_sim_w.bias"}  # fmt: skip
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        if name not in shift_invariant:
            assert parameter.grad.abs().sum() > 0, name
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert total <= 2.0 + 1e-4


def test_bad_inputs_have_clear_errors():
    model = SgrafModel(tiny_config()).eval()
    regions, input_ids = tiny_batch()
    with pytest.raises(ValueError, match=r"region_features must have shape \(batch, 4, 12\)"):
        model(regions[:, :3], input_ids)
    holes = torch.tensor([[1, 0, 1], [1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        model(regions, input_ids[:, :3], attention_mask=holes)
    with pytest.raises(ValueError, match="no tokens"):
        model(regions, input_ids, attention_mask=torch.zeros_like(input_ids))
    with pytest.raises(ValueError, match="module_name"):
        tiny_config("AVE")


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = SgrafModel(tiny_config("SAF")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).module_name == "SAF"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SgrafModel)
    regions, input_ids = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(regions, input_ids).sims, model(regions, input_ids).sims)


def test_initialisation_follows_the_original():
    model = SgrafModel(tiny_config())
    assert model.txt_enc.embed.weight.abs().max() <= 0.1
    fc = model.img_enc.fc
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.5 * bound
    assert (fc.bias == 0).all()
    gru_bound = model.config.embed_size**-0.5
    assert all(p.abs().max() <= gru_bound for p in model.txt_enc.cap_rnn.parameters())


def test_ensemble_is_the_mean_of_member_scores():
    sgr, saf = SgrafModel(tiny_config("SGR")).eval(), SgrafModel(tiny_config("SAF")).eval()
    regions, input_ids = tiny_batch()
    with torch.no_grad():
        expected = (sgr(regions, input_ids).sims + saf(regions, input_ids).sims) / 2
        torch.testing.assert_close(SgrafEnsemble([sgr, saf])(regions, input_ids), expected)
    with pytest.raises(ValueError, match="at least two"):
        SgrafEnsemble([sgr])


@pytest.mark.parametrize("module_name", MODULES)
def test_overfits_eight_pairs(module_name):
    torch.manual_seed(0)
    model = SgrafModel(tiny_config(module_name, dropout=0.0, caption_chunk_size=8))
    regions, input_ids = tiny_batch(seed=4, lengths=(5, 4, 6, 3, 5, 7, 4, 6))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        model(regions, input_ids, return_loss=True).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        sims = model(regions, input_ids).sims
    assert (sims.argmax(dim=1) == torch.arange(8)).all(), sims  # image -> text R@1 = 100
    assert (sims.argmax(dim=0) == torch.arange(8)).all(), sims  # text -> image R@1 = 100
