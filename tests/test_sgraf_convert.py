"""Converter of released SGRAF checkpoints, on synthetic checkpoints in the original format; and the tokenizer."""

import argparse

import nltk
import numpy as np
import pytest
import torch

from cusa_hf.models.sgraf.modeling_sgraf import SgrafModel
from cusa_hf.models.sgraf.convert import convert_checkpoint, load_original_checkpoint, main
from cusa_hf.models.sgraf.tokenization_sgraf import SgrafTokenizer, build_vocab, read_vocab, word_tokenize, write_vocab

E, S, V, W, D, R = 16, 8, 20, 8, 12, 4  # embed, sim, vocab, word, region feature dims; regions


def original_state_dicts(module_name: str, sgr_step: int = 2, seed: int = 0):
    """The three state dicts of the original EncoderImage / EncoderText / EncoderSimilarity, by their key names."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    def linear(prefix, out_dim, in_dim):
        return {f"{prefix}.weight": rand(out_dim, in_dim), f"{prefix}.bias": rand(out_dim)}

    def batch_norm(prefix, channels):
        return {
            f"{prefix}.weight": rand(channels) + 1, f"{prefix}.bias": rand(channels),
            f"{prefix}.running_mean": rand(channels), f"{prefix}.running_var": rand(channels).abs() + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(1234),
        }

    image = linear("fc", E, D)
    text = {"embed.weight": rand(V, W)}
    for suffix in ("", "_reverse"):
        text.update({
            f"cap_rnn.weight_ih_l0{suffix}": rand(3 * E, W), f"cap_rnn.weight_hh_l0{suffix}": rand(3 * E, E),
            f"cap_rnn.bias_ih_l0{suffix}": rand(3 * E), f"cap_rnn.bias_hh_l0{suffix}": rand(3 * E),
        })
    similarity = {
        **linear("v_global_w.embedding_local.0", E, E), **batch_norm("v_global_w.embedding_local.1", R),
        **linear("v_global_w.embedding_global.0", E, E), **batch_norm("v_global_w.embedding_global.1", E),
        **linear("v_global_w.embedding_common.0", 1, E),
        **linear("t_global_w.embedding_local.0", E, E), **linear("t_global_w.embedding_global.0", E, E),
        **linear("t_global_w.embedding_common.0", 1, E),
        **linear("sim_tranloc_w", S, E), **linear("sim_tranglo_w", S, E), **linear("sim_eval_w", 1, S),
    }
    if module_name == "SGR":
        for step in range(sgr_step):
            for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
                similarity.update(linear(f"SGR_module.{step}.{name}", S, S))
    else:
        similarity.update({**linear("SAF_module.attn_sim_w", 1, S), **batch_norm("SAF_module.bn", 1)})
    return [image, text, similarity]


def original_options(module_name: str, **overrides) -> argparse.Namespace:
    options = dict(
        data_name="coco_precomp", batch_size=128, learning_rate=0.0002, grad_clip=2.0, margin=0.2,
        max_violation=True, img_dim=D, word_dim=W, embed_size=E, sim_dim=S, num_layers=1, bi_gru=True,
        no_imgnorm=False, no_txtnorm=False, module_name=module_name, sgr_step=2, vocab_size=V,
    )
    options.update(overrides)
    return argparse.Namespace(**options)


def write_checkpoint(path, module_name, **extra):
    torch.save(
        {"epoch": 17, "model": original_state_dicts(module_name), "best_rsum": np.float64(421.5),
         "opt": original_options(module_name), "Eiters": 99, **extra},
        path,
    )


class NotAllowListed:
    pass


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_convert_round_trip(tmp_path, module_name):
    checkpoint = tmp_path / "model_best.pth.tar"
    write_checkpoint(checkpoint, module_name)
    model = convert_checkpoint(checkpoint, tmp_path / "hf")
    assert model.config.module_name == module_name and model.config.vocab_size == V and model.config.num_regions == R
    converted = model.state_dict()
    for prefix, part in zip(("img_enc", "txt_enc", "sim_enc"), original_state_dicts(module_name)):
        for key, tensor in part.items():
            torch.testing.assert_close(converted[f"{prefix}.{key}"], tensor, rtol=0, atol=0)
    assert len(converted) == sum(len(part) for part in original_state_dicts(module_name))

    reloaded = SgrafModel.from_pretrained(tmp_path / "hf").eval()
    regions = torch.randn(3, R, D)
    input_ids = torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 0, 0], [1, 4, 8, 2, 0]])
    with torch.no_grad():
        expected = model(regions, input_ids).sims
        torch.testing.assert_close(reloaded(regions, input_ids).sims, expected, rtol=0, atol=0)
    # Eval mode uses the checkpoint's BatchNorm running statistics.
    assert float(reloaded.sim_enc.v_global_w.embedding_local[1].num_batches_tracked) == 1234


def test_convert_rejects_mismatches(tmp_path):
    bad_vocab = tmp_path / "bad.pth.tar"
    torch.save({"model": original_state_dicts("SGR"), "opt": original_options("SGR", vocab_size=21)}, bad_vocab)
    with pytest.raises(ValueError, match="vocab_size=21 but txt_enc.embed.weight has 20 rows"):
        convert_checkpoint(bad_vocab)
    missing_key = original_state_dicts("SAF")
    del missing_key[2]["SAF_module.bn.running_var"]
    torch.save({"model": missing_key, "opt": original_options("SAF")}, tmp_path / "missing.pth.tar")
    with pytest.raises(RuntimeError, match="running_var"):
        convert_checkpoint(tmp_path / "missing.pth.tar")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an SGRAF checkpoint"):
        convert_checkpoint(tmp_path / "other.pth")


def test_unpickling_is_restricted_unless_trusted(tmp_path):
    checkpoint = tmp_path / "model_best.pth.tar"
    write_checkpoint(checkpoint, "SAF", extra=NotAllowListed())
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        load_original_checkpoint(checkpoint)
    assert isinstance(load_original_checkpoint(checkpoint, trust_checkpoint=True)["extra"], NotAllowListed)


def test_cli_converts_with_vocabulary(tmp_path, capsys):
    checkpoint = tmp_path / "model_best.pth.tar"
    write_checkpoint(checkpoint, "SGR")
    vocab = {token: index for index, token in enumerate(["<pad>", "<start>", "<end>", "<unk>", *"abcdefghijklmnop"])}
    write_vocab(vocab, tmp_path / "coco_precomp_vocab.json")
    main(["--checkpoint", str(checkpoint), "--vocab", str(tmp_path / "coco_precomp_vocab.json"),
          "--output", str(tmp_path / "out")])
    assert "SGR" in capsys.readouterr().out
    tokenizer = SgrafTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("b a zebra")["input_ids"] == [1, 5, 4, 3, 2]
    write_vocab(dict(list(vocab.items())[:10]), tmp_path / "small.json")
    with pytest.raises(ValueError, match="10 words but the checkpoint's embedding has 20 rows"):
        convert_checkpoint(checkpoint, vocab_file=tmp_path / "small.json")


def test_tokenizer_matches_the_original_scheme(tmp_path):
    captions = ["A man rides a horse.", "a man, a dog", "The dog's bone", "a dog runs"]
    vocab = build_vocab(captions, min_count=2)
    assert list(vocab) == ["<pad>", "<start>", "<end>", "<unk>", "a", "man", "dog"]  # first appearance order
    write_vocab(vocab, tmp_path / "vocab.json")
    tokenizer = SgrafTokenizer(vocab_file=str(tmp_path / "vocab.json"))
    assert tokenizer.tokenize("The dog's bone, A MAN.") == ["the", "dog", "'s", "bone", ",", "a", "man", "."]
    batch = tokenizer(["a dog", "A man rides"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[1, 4, 6, 2, 0], [1, 4, 5, 3, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    tokenizer.save_pretrained(tmp_path / "saved")
    assert read_vocab(tmp_path / "saved" / "vocab.json") == vocab
    write_vocab({"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3}, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="'<pad>' must have id 0"):
        read_vocab(tmp_path / "bad.json")


def test_tokenizer_splits_sentences_as_nltk_word_tokenize_does(tmp_path, monkeypatch):
    # No punkt data anywhere NLTK looks: the tokenizer must not need the download.
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    caption = "A man rides a horse. The horse is brown."
    # What the original's nltk.word_tokenize(caption.lower()) gives: Punkt ends the first sentence at "horse.", and the
    # Treebank tokenizer splits the final period off each sentence.
    assert word_tokenize(caption) == ["a", "man", "rides", "a", "horse", ".", "the", "horse", "is", "brown", "."]
    # The documented difference: the trained English model would keep the abbreviation "st." whole.
    assert word_tokenize("A sign on Main St. near a bus") == ["a", "sign", "on", "main", "st", ".", "near", "a", "bus"]

    write_vocab(build_vocab(["a man rides a horse", "the horse is brown ."], min_count=1), tmp_path / "vocab.json")
    tokenizer = SgrafTokenizer(vocab_file=str(tmp_path / "vocab.json"))
    unk_id = tokenizer.convert_tokens_to_ids("<unk>")
    input_ids = tokenizer(caption)["input_ids"]
    assert unk_id not in input_ids
    assert tokenizer.convert_ids_to_tokens(input_ids[5:8]) == ["horse", ".", "the"]
