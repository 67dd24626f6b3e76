"""Parity of cliptrans.py + weights.py with Hugging Face, on tiny random models built from explicit configs.

Each Hugging Face model is saved with `save_pretrained`, converted by weights.py, loaded by weights.load and
compared in fp32 with eager attention on the same inputs."""

import gc
import json
import math
import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend

import weights
from cliptrans import CLIPTrans, CLIPTransConfig, MappingConfig, prefix_mask
from decoding import Cache, beam_candidates, cuda_graph, linears_cast, matmul_attention, topk_by_chunks
from conftest import assert_close, hf_param_counts, mclip_reference

import transformers  # noqa: E402  (a test dependency: requirements.txt)


def padded_batch(vocab_size, lengths, pad_id=1, lang_id=None, seed=0, device="cpu"):
    """Right-padded (B, T) ids `[lang] x </s>` (or `<s> x </s>` when lang_id is None) and their mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        body = torch.randint(4, vocab_size - 60, (n - 2,), generator=g)  # ordinary pieces, no special tokens
        ids[i, :n] = torch.cat([torch.tensor([0 if lang_id is None else lang_id]), body, torch.tensor([2])])
        mask[i, :n] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------- towers


def test_image_embeddings_equal_hf(model, hf_clip_dir, device):
    hf = transformers.CLIPModel.from_pretrained(hf_clip_dir, attn_implementation="eager", dtype=torch.float32)
    hf = hf.eval().to(device)
    size = model.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=pixels)
        ref = ref if torch.is_tensor(ref) else ref.pooler_output
        assert_close(model.encode_image(pixels), ref, name="image embedding")


def test_vision_only_folder_converts_to_the_same_tower(tmp_path, hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir,
                                                       hf_clip_vision_dir, device):
    weights.convert_all(hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir, hf_clip_vision_dir, tmp_path)
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(
        hf_clip_vision_dir, attn_implementation="eager", dtype=torch.float32).eval().to(device)
    ours = weights.load(tmp_path, device=device)
    size = ours.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        assert_close(ours.encode_image(pixels), hf(pixel_values=pixels).image_embeds, name="vision-only tower")


def test_text_embeddings_equal_mclip_on_padded_batch(model, hf_mclip, device):
    ids, mask = padded_batch(model.config.text.vocab_size, [9, 4, 6, 3], device=device)
    with torch.no_grad():
        ref = mclip_reference(hf_mclip.to(device), ids, mask)
        assert_close(model.encode_text(ids, mask), ref, name="text embedding")


# ----------------------------------------------------------------------------- mBART


def test_encoder_states_and_logits_equal_hf_on_padded_batch(model, hf_mbart, device):
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [8, 5, 3], lang_id=V - 51, device=device)  # a language code, then the sentence
    dec, _ = padded_batch(V, [7, 7, 7], lang_id=V - 48, seed=1, device=device)
    with torch.no_grad():
        ref_enc = hf_mbart.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        ours_enc = model.mbart.encode(ids, mask)
        assert_close(ours_enc[mask.bool()], ref_enc[mask.bool()], name="encoder states (real tokens)")
        ref = hf_mbart(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert_close(model.mbart(ids, mask, dec), ref, name="mBART logits")


def hf_generate_with_eos_boost(hf_mbart, boost, tgt_lang_id=None, **kw):
    """Hugging Face's generate in MBart.generate's terms: the target language `tgt_lang_id` (its
    forced_bos_token_id), and the new tokens returned (B, n): its output less the decoder start token."""
    lang = {} if tgt_lang_id is None else {"forced_bos_token_id": tgt_lang_id}
    with torch.no_grad():
        hf_mbart.final_logits_bias[0, 2] += boost
        try:
            out = hf_mbart.generate(do_sample=False, **lang, **kw)
        finally:
            hf_mbart.final_logits_bias[0, 2] -= boost
    assert (out[:, 0] == hf_mbart.config.decoder_start_token_id).all()
    return out[:, 1:]


def ours_generate_with_eos_boost(model, boost, *args, **kw):
    with torch.no_grad():
        model.mbart.final_logits_bias[2] += boost
        try:
            return model.mbart.generate(*args, **kw)
        finally:
            model.mbart.final_logits_bias[2] -= boost


def boost_for_varied_lengths(hf_mbart, **kw):
    """The smallest raise of the </s> logit at which Hugging Face ends the sentences at different lengths."""
    for boost in torch.arange(0.0, 10.0, 0.25).tolist():
        lengths = (hf_generate_with_eos_boost(hf_mbart, boost, **kw) != 1).sum(1)
        if len(set(lengths.tolist())) > 1:
            return boost
    raise AssertionError("no </s> bias makes these sentences end at different lengths")


# How the decoding steps attend (generate's `attention`): PyTorch's choice, the matmul attention, and on CUDA
# the memory-efficient kernel alone (SDPA has no such kernel on a CPU).
DECODE_ATTENTIONS = [None, "matmul", pytest.param(
    [SDPBackend.EFFICIENT_ATTENTION], id="efficient",
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's memory-efficient kernel needs a GPU"))]


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("vary_lengths", [False, True])
@pytest.mark.parametrize("attention", DECODE_ATTENTIONS)
def test_generate_equals_hf(peaked_pair, num_beams, vary_lengths, attention, device):
    hf_mbart, model = peaked_pair
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [9, 6, 4, 7, 5, 8], lang_id=V - 51, seed=3, device=device)
    lang = V - 48
    args = dict(num_beams=num_beams, max_new_tokens=12, tgt_lang_id=lang)
    hf_args = dict(input_ids=ids, attention_mask=mask, early_stopping=True, length_penalty=1.0, **args)
    boost = boost_for_varied_lengths(hf_mbart, **hf_args) if vary_lengths else 0.0
    ref = hf_generate_with_eos_boost(hf_mbart, boost, **hf_args)
    ours = ours_generate_with_eos_boost(model, boost, ids, mask, attention=attention, **args)
    assert ours[:, 0].eq(lang).all(), "the target language is forced as the first generated token"
    assert torch.equal(ours, ref), f"\nours:\n{ours}\nhf:\n{ref}"


@pytest.mark.parametrize("T", [1, 5])
def test_matmul_attention_equals_sdpa(T):
    g = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g) for n in (T, 9, 9))
    mask = torch.rand(3, 1, 1, 9, generator=g) > 0.3
    mask[:, :, :, 0] = True  # every query sees a key
    for m in (None, mask):
        assert_close(matmul_attention(q, k, v, m), F.scaled_dot_product_attention(q, k, v, attn_mask=m), atol=1e-6)


def test_topk_by_chunks_equals_torch_topk():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64 * 50, generator=g)
    x[1, 1000:1100] += 5.0  # the best entries crowded into two chunks
    x[2] = -math.inf  # a forced row: one entry at 0, all others -inf
    x[2, 77] = 0.0
    x[3, ::64] += 10.0  # the best entries spread one per chunk
    for k in (1, 4, 10):
        values, index = topk_by_chunks(x, k)
        ref_values, ref_index = torch.topk(x, k)
        assert torch.equal(values, ref_values)
        finite = ref_values.isfinite()  # ties among -inf may be broken either way
        assert torch.equal(index[finite], ref_index[finite])
        assert torch.equal(x.gather(1, index), values)
    values, index = topk_by_chunks(x[:, :128], 4)  # fewer chunks than k: plain top-k
    assert torch.equal(values, torch.topk(x[:, :128], 4).values)
    assert torch.equal(topk_by_chunks(x, 4, chunk=0)[0], torch.topk(x, 4).values)  # chunk=0: plain top-k


def test_beam_candidates_are_the_top_k_of_the_log_probabilities():
    """beam_candidates finds the tokens in the logits: the same as a top-k over transformers' scores (log-softmax,
    then the banned token at -inf), also when the banned token is among the best; compiled, the same tokens."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(6, 64 * 40, generator=g) * 3
    x[:3, 2] += 10.0  # the banned token first in half of the rows
    for banned in (None, 2):
        scores = F.log_softmax(x, -1)
        if banned is not None:
            scores[:, banned] = -math.inf
        ref_values, ref_tokens = torch.topk(scores, 8)
        values, tokens = beam_candidates(x, 8, banned)
        assert torch.equal(tokens, ref_tokens) and torch.equal(values, ref_values)
        compiled = torch.compile(beam_candidates)(x, 8, banned)
        assert torch.equal(compiled[1], ref_tokens)
        assert_close(compiled[0], ref_values, atol=1e-5, name="compiled log-probabilities")


def test_compiled_scores_give_the_same_beams(peaked_pair, device):
    model = peaked_pair[1]
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [9, 6, 4, 7, 5, 8], lang_id=V - 51, seed=3, device=device)
    args = dict(num_beams=4, max_new_tokens=10, min_new_tokens=4, tgt_lang_id=V - 48)
    with torch.no_grad():
        assert torch.equal(model.mbart.generate(ids, mask, compile_scores=True, **args),
                           model.mbart.generate(ids, mask, compile_scores=False, **args))


@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), ("never", 1.0), (True, 0.6), (True, 2.0)])
def test_beam_search_options_equal_hf(peaked_pair, early_stopping, length_penalty, device):
    hf_mbart, model = peaked_pair
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [5, 8, 6, 9, 4], lang_id=V - 51, seed=4, device=device)
    args = dict(num_beams=3, max_new_tokens=10, early_stopping=early_stopping, length_penalty=length_penalty)
    boost = boost_for_varied_lengths(hf_mbart, input_ids=ids, attention_mask=mask, **args)
    ref = hf_generate_with_eos_boost(hf_mbart, boost, input_ids=ids, attention_mask=mask, **args)
    ours = ours_generate_with_eos_boost(model, boost, ids, mask, **args)
    assert torch.equal(ours, ref), f"\nours:\n{ours}\nhf:\n{ref}"


@pytest.mark.parametrize("num_beams", [1, 4])
def test_min_new_tokens_equals_hf(peaked_pair, num_beams, device):
    """`</s>` banned for the first min_new_tokens steps, with `</s>` raised so that without the ban some sentence
    would end sooner: the same tokens as Hugging Face."""
    hf_mbart, model = peaked_pair
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [9, 6, 4, 7, 5, 8], lang_id=V - 51, seed=5, device=device)
    args = dict(input_ids=ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=12,
                tgt_lang_id=V - 48, early_stopping=True, length_penalty=1.0)
    lengths = lambda out: (out != 1).sum(1)  # noqa: E731  new tokens
    boost = next(b for b in torch.arange(0.0, 20.0, 0.5).tolist()
                 if lengths(hf_generate_with_eos_boost(hf_mbart, b, **args)).min() < 6)
    ref = hf_generate_with_eos_boost(hf_mbart, boost, min_new_tokens=6, **args)
    ours = ours_generate_with_eos_boost(model, boost, ids, mask, min_new_tokens=6,
                                        **{k: v for k, v in args.items() if k not in ("input_ids", "attention_mask")})
    assert lengths(ref).min() >= 6
    assert torch.equal(ours, ref), f"\nours:\n{ours}\nhf:\n{ref}"


def test_beams_attend_one_copy_of_the_source(model, device):
    """Decoding with G beams per sentence, which run the prompt once per sentence and attend one copy of its source
    and of its prompt (the decoder handed a decoding.Cache), computes what the whole decoder computes on each beam's
    sequence with every source repeated G times."""
    dec, c = model.mbart.decoder, model.config.mbart
    G, P = 3, 4
    src, src_mask = padded_batch(c.vocab_size, [7, 4], lang_id=c.vocab_size - 51, seed=13, device=device)
    g = torch.Generator().manual_seed(14)
    prompt = torch.randn(2, P, c.d_model, generator=g).to(device)
    new = torch.randn(2 * G, 1, c.d_model, generator=g).to(device)  # each beam its own next token
    with torch.no_grad():
        memory = model.mbart.encode(src, src_mask)
        full = dec(torch.cat([prompt.repeat_interleave(G, 0), new], 1), memory.repeat_interleave(G, 0),
                   src_mask.repeat_interleave(G, 0))  # (2 G, P + 1, d)
        cache = Cache(P + 1, beams=G)
        once = dec(prompt, memory, src_mask, cache=cache)  # causal
        assert_close(once, full[::G, :P], atol=1e-5, name="the prompt, once per sentence")
        pos = torch.tensor(P, device=device)
        step = dec(new, memory, src_mask, cache.begin_step(pos), start=pos, cache=cache)[:, -1]
        assert_close(step, full[:, P], atol=1e-5, name="cached step of each beam")
        assert all(k.shape[0] == 2 for k, _ in cache.cross.values()), "the source's keys: one copy per sentence"


def test_beams_attend_their_own_history_without_moving_the_cache():
    """decoding.Cache, reordered through `owner` (no key or value moves), against each beam's own history moved row
    by row as transformers does: the same attention (`Cache.attend`, the beams of a sentence as one row, with SDPA
    and with the matmul attention) for the prompt written once for all beams, then decoding steps whose beams
    continue random parents of the same sentence."""
    g = torch.Generator().manual_seed(15)
    B, nb, H, P, Dh, steps = 2, 3, 2, 2, 4, 4
    cache = Cache(max_len=P + steps, beams=nb)
    layers = ("layer 0", "layer 1")  # the keys of the cache's buffers (the model's are its Attention modules)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    k, v = randn(B, H, P, Dh), randn(B, H, P, Dh)
    for layer in layers:
        keys, values = cache.update(layer, k, v)
        assert torch.equal(keys, k) and torch.equal(values, v)
    hist_k, hist_v = k.repeat_interleave(nb, 0), v.repeat_interleave(nb, 0)  # (B * nb, H, t, Dh): every beam's own
    rows = torch.arange(B)[:, None] * nb
    for step in range(steps):
        if step:
            parent = torch.randint(nb, (B, nb), generator=g)
            cache.reorder(parent)
            hist_k, hist_v = hist_k[(rows + parent).view(-1)], hist_v[(rows + parent).view(-1)]
        mask = cache.begin_step(torch.tensor(P + step))  # (B, 1, nb, nb * max_len)
        k, v, q = randn(B * nb, H, 1, Dh), randn(B * nb, H, 1, Dh), randn(B * nb, H, 1, Dh)
        keys, values = cache.update(layers[1], k, v)  # (B, H, nb * max_len, Dh)
        hist_k, hist_v = torch.cat([hist_k, k], 2), torch.cat([hist_v, v], 2)
        assert mask.sum(-1).eq(P + step + 1).all(), "each beam sees its P + step + 1 positions, once each"
        ref = F.scaled_dot_product_attention(q, hist_k, hist_v)  # (B * nb, H, 1, Dh)
        q, ref = (t.transpose(1, 2).reshape(B * nb, 1, H * Dh) for t in (q, ref))  # (rows, 1, C), as Attention's
        for attention in (None, "matmul"):  # SDPA, then the matmul attention
            cache.attention = attention
            assert_close(cache.attend(q, keys, values, mask), ref, atol=1e-6, name=f"{attention}, step {step}")


# ----------------------------------------------------------------------------- CLIPTrans: prefix, cache, loss


def test_prefix_mask_matches_its_definition():
    P, T = 3, 9
    mask = prefix_mask(P, T)
    for i in range(T):
        for j in range(T):
            if i == 0:
                allowed = j == 0  # </s> sees only itself
            elif 1 <= i <= P:
                allowed = j <= P  # a prefix vector sees </s> and the whole prefix, in both directions
            else:
                allowed = j <= i  # causal
            assert mask[i, j].item() == allowed, (i, j)


def test_prefix_is_bidirectional_and_targets_causal(model, device):
    """Perturb one input vector and see which decoder outputs move."""
    c = model.config
    P, d = c.mapping.prefix_len, c.mbart.d_model
    ids, mask = padded_batch(c.mbart.vocab_size, [6], lang_id=5, device=device)
    T = 1 + P + 5
    x = torch.randn(1, T, d, generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        memory = model.mbart.encode(ids, mask)
        run = lambda x: model.mbart.decoder(x, memory, mask, mask=prefix_mask(P, T, device))  # noqa: E731
        base = run(x)
        y = x.clone()
        bump = torch.randn(d, generator=torch.Generator().manual_seed(6)).to(device)  # not a constant: LayerNorm removes those
        y[0, P] += bump  # the last prefix vector
        moved = (run(y) - base).abs().amax(-1)[0] > 1e-6
        assert not moved[0] and moved[1:].all(), "all prefix vectors and every later position see the last prefix vector"
        y = x.clone()
        y[0, P + 2] += bump  # a target token
        moved = (run(y) - base).abs().amax(-1)[0] > 1e-6
        assert not moved[:P + 2].any() and moved[P + 2:].all(), "target positions are causal"


def test_loss_ignores_prefix_positions(model, device):
    c = model.config
    P, V = c.mapping.prefix_len, c.mbart.vocab_size
    src, src_mask = padded_batch(V, [7, 5], lang_id=V - 51, seed=6, device=device)
    tgt, _ = padded_batch(V, [6, 4], lang_id=V - 48, seed=7, device=device)
    clip = torch.randn(2, c.vision.embed_dim, generator=torch.Generator().manual_seed(8)).to(device)
    with torch.no_grad():
        embeds, labels = model.decoder_inputs(clip, tgt)
        assert embeds.shape[1] == labels.shape[1] == 1 + P + tgt.shape[1] - 1
        assert torch.equal(labels[:, 0], tgt[:, 0]), "position 0 (</s>) predicts the language code"
        assert (labels[:, 1:P + 1] == -100).all(), "prefix positions predict nothing"
        assert torch.equal(labels[:, P + 1:], tgt[:, 1:].masked_fill(tgt[:, 1:] == 1, -100))
        # Direct computation: all logits, then the mean of -log p over labelled positions.
        memory = model.mbart.encode(src, src_mask)
        h = model.mbart.decoder(embeds, memory, src_mask, mask=prefix_mask(P, embeds.shape[1], device))
        logp = F.log_softmax(model.mbart.logits(h), -1)
        terms = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(labels.shape[1]) if labels[b, t] != -100]
        assert_close(model(clip, src, src_mask, tgt), torch.stack(terms).mean(), atol=1e-5, name="loss")


# ----------------------------------------------------------------------------- the text-only baseline


def text_only(model):
    """A copy of `model` with prefix length 0: plain mBART-50, the paper's text-only baseline."""
    copy = CLIPTrans(CLIPTransConfig.from_dict(model.config.to_dict())).to(model.mbart.shared.weight.device)
    copy.load_state_dict(model.state_dict())
    copy.new_mapping(MappingConfig(prefix_len=0))
    assert not list(copy.mapping.parameters()), "no mapping network to train"
    return copy.eval()


def test_text_only_loss_equals_hf_with_labels(model, hf_mbart, device):
    """Prefix length 0: the loss is MBartForConditionalGeneration's with `labels` (decoder input `</s> <lang>
    y1..yn`, shifted by Hugging Face from the labels), on a padded batch, with no CLIP vector at all."""
    baseline = text_only(model)
    V = model.config.mbart.vocab_size
    src, src_mask = padded_batch(V, [8, 5, 3], lang_id=V - 51, seed=20, device=device)
    tgt, _ = padded_batch(V, [6, 9, 4], lang_id=V - 48, seed=21, device=device)
    with torch.no_grad():
        ref = hf_mbart(input_ids=src, attention_mask=src_mask, labels=tgt.masked_fill(tgt == 1, -100)).loss
        ours = baseline(torch.zeros(3, 0, device=device), src, src_mask, tgt)
    assert_close(ours, ref, atol=1e-5, name="text-only loss")
    with torch.no_grad():  # and the prefix model's loss differs, so the comparison can tell them apart
        clip = torch.randn(3, model.config.vision.embed_dim, generator=torch.Generator().manual_seed(22))
        assert (model(clip.to(device), src, src_mask, tgt) - ref).abs() > 1e-3


@pytest.mark.parametrize("num_beams", [1, 4])
def test_text_only_generation_equals_hf(peaked_pair, num_beams, device):
    hf_mbart, model = peaked_pair
    baseline = text_only(model)
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [9, 6, 4, 7, 5, 8], lang_id=V - 51, seed=23, device=device)
    args = dict(num_beams=num_beams, max_new_tokens=12)
    boost = boost_for_varied_lengths(hf_mbart, input_ids=ids, attention_mask=mask, tgt_lang_id=V - 48,
                                     early_stopping=True, **args)
    ref = hf_generate_with_eos_boost(hf_mbart, boost, input_ids=ids, attention_mask=mask, early_stopping=True,
                                     tgt_lang_id=V - 48, **args)
    with torch.no_grad():
        baseline.mbart.final_logits_bias[2] += boost
        ours = baseline.generate(torch.zeros(6, 0, device=device), ids, mask, tgt_lang_id=V - 48, **args)
    assert len(set((ref != 1).sum(1).tolist())) > 1, "sentences of several lengths"
    assert torch.equal(ours, ref), f"\nours:\n{ours}\nhf:\n{ref}"


def test_kv_cache_decoding_equals_full_recomputation(peaked_pair, device):
    model = peaked_pair[1]
    c = model.config
    P, V = c.mapping.prefix_len, c.mbart.vocab_size
    src, src_mask = padded_batch(V, [7, 4], lang_id=V - 51, seed=9, device=device)
    clip = torch.randn(2, c.vision.embed_dim, generator=torch.Generator().manual_seed(10)).to(device)
    with torch.no_grad():
        out = model.generate(clip, src, src_mask, tgt_lang_id=V - 48, num_beams=1, max_new_tokens=8)
        # Greedy decoding again, recomputing the whole decoder on the whole sequence at every step.
        memory = model.mbart.encode(src, src_mask)
        eos = model.mbart.embed_tokens(torch.full((2, 1), 2, device=device))
        seq = torch.cat([eos, model.mapping(clip)], 1)
        tokens = []
        for step in range(out.shape[1]):
            h = model.mbart.decoder(seq, memory, src_mask, mask=prefix_mask(P, seq.shape[1], device))
            logits = model.mbart.logits(h[:, -1])
            tok = logits.argmax(-1)
            forced = V - 48 if step == 0 else 2 if step == 7 else None  # the language, and </s> at the last step
            tok = tok if forced is None else torch.full_like(tok, forced)
            tokens.append(tok)
            seq = torch.cat([seq, model.mbart.embed_tokens(tok[:, None])], 1)
        full = torch.stack(tokens, 1)
        ended = (full == 2).int().cumsum(1) - (full == 2).int() > 0  # after the first </s>: padding
        full[ended] = 1
        assert torch.equal(out, full[:, :out.shape[1]])
        # And the hidden states of one cached step equal the full computation's last position.
        dec, L = model.mbart.decoder, seq.shape[1]
        cache, pos = Cache(L), torch.tensor(L - 1, device=device)
        dec(seq[:, :-1], memory, src_mask, prefix_mask(P, L - 1, device), cache=cache)
        step = dec(seq[:, -1:], memory, src_mask, cache.begin_step(pos), start=pos, cache=cache)[:, -1]
        full_h = dec(seq, memory, src_mask, mask=prefix_mask(P, L, device))
        assert_close(step, full_h[:, -1], atol=1e-5, name="cached step")


def test_decoding_with_linears_cast_once_equals_autocast(peaked_pair, device):
    """The CUDA graph of a decoding step is recorded with the decoder's Linear weights cast once to the autocast
    dtype: the same numbers as autocast casting them at every call (here on the CPU, in bf16), and the model's
    own fp32 parameters are back in place afterwards."""
    model = peaked_pair[1]
    dec = model.mbart.decoder
    V = model.config.mbart.vocab_size
    src, src_mask = padded_batch(V, [7, 4], lang_id=V - 51, seed=12, device="cpu")
    before = {n: p for n, p in dec.named_parameters()}
    model.cpu()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            memory = model.mbart.encode(src, src_mask)
            x = model.mbart.embed_tokens(torch.tensor([[2], [2]]))
            plain = dec(x, memory, src_mask)
            with linears_cast(dec, torch.bfloat16) as copies:
                assert copies and all(p.dtype == torch.bfloat16 for p in copies)
                cast = dec(x, memory, src_mask)
        assert plain.dtype == cast.dtype and torch.equal(plain, cast)
        assert all(p is before[n] and p.dtype == torch.float32 for n, p in dec.named_parameters())
    finally:
        model.to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("attention", DECODE_ATTENTIONS)
def test_cuda_graph_decoding_equals_plain_launches_in_bf16(peaked_pair, num_beams, attention):
    model = peaked_pair[1]
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [9, 6, 4, 7, 5, 8], lang_id=V - 51, seed=3, device="cuda")
    args = dict(num_beams=num_beams, max_new_tokens=12, tgt_lang_id=V - 48, attention=attention)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graph = model.mbart.generate(ids, mask, use_cuda_graph=True, **args)
        plain = model.mbart.generate(ids, mask, use_cuda_graph=False, **args)
    assert torch.equal(graph, plain), f"\ngraph:\n{graph}\nplain:\n{plain}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_is_freed_without_the_cycle_collector():
    """A recorded graph is freed as soon as its last reference goes: left to the cycle collector, it could be freed
    in the middle of the next generation's recording, which breaks that recording. Then a second recording works."""
    x = torch.randn(64, 64, device="cuda")
    gc.disable()
    try:
        for _ in range(2):
            step = cuda_graph(lambda: x @ x)
            assert torch.equal(step(), x @ x) and torch.equal(step(), x @ x)  # recorded, then replayed
            alive = weakref.ref(step)
            del step
            assert alive() is None
    finally:
        gc.enable()


def test_beam_search_with_prefix_runs_and_forces_language(model, device):
    c = model.config
    V = c.mbart.vocab_size
    src, src_mask = padded_batch(V, [6, 5, 8], lang_id=V - 51, seed=11, device=device)
    clip = torch.randn(3, c.vision.embed_dim).to(device)
    with torch.no_grad():
        out = model.generate(clip, src, src_mask, tgt_lang_id=V - 48, num_beams=4, max_new_tokens=7)
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 7
    assert out[:, 0].eq(V - 48).all()


# ----------------------------------------------------------------------------- the paper preset


def test_paper_preset_parameter_counts_equal_hf():
    with torch.device("meta"):
        ours = CLIPTrans(CLIPTransConfig.preset("paper"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    hf = hf_param_counts()
    assert count(ours.mbart) == hf["mbart"], "mbart-large-50"
    assert count(ours.text) == hf["xlmr"] + 1024 * 512 + 512, "XLM-R large + M-CLIP's Linear(1024, 512)"
    assert count(ours.vision) == hf["clip_vision"], "CLIP ViT-B/32 vision + projection"


# ----------------------------------------------------------------------------- other formats and bad folders


def test_converted_folder_keeps_the_towers_in_their_own_file(converted, model):
    """towers.safetensors holds the frozen towers, cliptrans.safetensors the rest: each tensor once, together
    the whole model, which weights.load reads back."""
    towers, rest = load_file(converted / weights.TOWERS_FILE), load_file(converted / weights.WEIGHTS_FILE)
    assert towers and all(k.startswith(("vision.", "text.")) for k in towers)
    assert not any(k.startswith(("vision.", "text.")) for k in rest)
    assert towers.keys() | rest.keys() == model.state_dict().keys()


@pytest.mark.parametrize("variant", ["hf_mbart_bin_dir", "hf_mbart_sharded_dir"])
def test_bin_and_sharded_checkpoints_convert_identically(request, tmp_path, variant, converted,
                                                         hf_mclip_dir, hf_xlmr_dir, hf_clip_dir):
    weights.convert_all(request.getfixturevalue(variant), hf_mclip_dir, hf_xlmr_dir, hf_clip_dir, tmp_path)
    a, b = load_file(converted / weights.WEIGHTS_FILE), load_file(tmp_path / weights.WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    state = load_file(path)
    edit(state, path)
    return dst


@pytest.mark.parametrize("breakage,message", [
    ("missing_file", "no weights in"),
    ("renamed_key", "unexpected keys, first: ['model.encoder.layers.0.fc1.weight_renamed']"),
    ("missing_key", "missing keys, first: ['mbart.encoder.layers.1.mlp.fc2.bias']"),
    ("wrong_shape", "model.decoder.layer_norm.weight has shape (7,), expected"),
    ("wrong_qkv_shape", "model.decoder.layers.0.self_attn.q_proj.weight has shape"),
    ("truncated", "is damaged or incomplete"),
    ("lfs_pointer", "pytorch_model.bin is a Git LFS pointer, not the weights"),
])
def test_bad_mbart_folder_fails_clearly(tmp_path, hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir, hf_clip_dir,
                                        breakage, message):
    def edit(state, path):
        if breakage == "missing_file":
            path.unlink()
        elif breakage == "renamed_key":
            state["model.encoder.layers.0.fc1.weight_renamed"] = state.pop("model.encoder.layers.0.fc1.weight")
            save_file(state, path)
        elif breakage == "missing_key":
            del state["model.encoder.layers.1.fc2.bias"]
            save_file(state, path)
        elif breakage == "wrong_shape":
            state["model.decoder.layer_norm.weight"] = torch.ones(7)
            save_file(state, path)
        elif breakage == "wrong_qkv_shape":  # (q, k and v are joined: checked before that)
            key = "model.decoder.layers.0.self_attn.q_proj.weight"
            state[key] = torch.zeros(2 * state[key].shape[0], state[key].shape[1])
            save_file(state, path)
        elif breakage == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif breakage == "lfs_pointer":  # a clone made without `git lfs`: a pickle-sized text file in its place
            path.unlink()
            (path.parent / "pytorch_model.bin").write_text("version https://git-lfs.github.com/spec/v1\n"
                                                          f"oid sha256:{'0' * 64}\nsize 1234\n")

    bad = _broken_copy(hf_mbart_dir, tmp_path / "bad", edit)
    with pytest.raises(weights.ConversionError) as e:
        weights.convert_all(bad, hf_mclip_dir, hf_xlmr_dir, hf_clip_dir, tmp_path / "out")
    assert message in str(e.value), str(e.value)
    assert str(bad) in str(e.value), "the error names the folder"
    assert not (tmp_path / "out" / weights.WEIGHTS_FILE).exists(), "nothing half-written"


def test_unset_decoder_start_token_starts_from_bos_as_hf(peaked_pair, hf_mbart_dir, device):
    """A config with decoder_start_token_id null (transformers 5 writes unset fields so): the converter takes <s>,
    the token transformers' generate falls back to, and generation agrees with generate's."""
    hf_mbart, model = peaked_pair
    cfg = json.loads((hf_mbart_dir / "config.json").read_text())
    cfg["decoder_start_token_id"] = None
    start = weights.mbart_config(cfg, "a config").decoder_start_id
    assert start == cfg["bos_token_id"] != cfg["eos_token_id"]
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [9, 6, 4], lang_id=V - 51, seed=3, device=device)
    saved = (hf_mbart.config.decoder_start_token_id, hf_mbart.generation_config.decoder_start_token_id,
             model.mbart.config.decoder_start_id)
    hf_mbart.config.decoder_start_token_id = hf_mbart.generation_config.decoder_start_token_id = None
    model.mbart.config.decoder_start_id = start
    try:
        ref = hf_mbart.generate(input_ids=ids, attention_mask=mask, num_beams=1, max_new_tokens=6,
                                forced_bos_token_id=V - 48, do_sample=False)
        ours = model.mbart.generate(ids, mask, tgt_lang_id=V - 48, num_beams=1, max_new_tokens=6)
    finally:  # the session's shared models, as they were
        (hf_mbart.config.decoder_start_token_id, hf_mbart.generation_config.decoder_start_token_id,
         model.mbart.config.decoder_start_id) = saved
    assert (ref[:, 0] == start).all() and torch.equal(ours, ref[:, 1:]), f"\nours:\n{ours}\nhf:\n{ref}"


def test_convert_names_unexpected_keys_of_a_state_dict():
    with pytest.raises(weights.ConversionError, match=r"hf clip: 1 unexpected keys, first: \['bogus\.key'\]\. Is"):
        weights.convert({"bogus.key": torch.zeros(1)}, weights.CLIP_RULES, {}, "hf clip")


def test_wrong_folder_for_clip_fails_clearly(tmp_path, hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir):
    with pytest.raises(weights.ConversionError, match="has no 'image_size': is this the right model folder"):
        weights.convert_all(hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir, hf_mbart_dir, tmp_path)


def test_load_of_a_folder_without_weights_fails_clearly(tmp_path):
    with pytest.raises(weights.ConversionError, match="not a CLIPTrans weights folder"):
        weights.load(tmp_path)


def test_command_line_reports_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        weights.main(["--mbart", str(tmp_path / "nope"), "--mclip", str(tmp_path), "--xlmr", str(tmp_path),
                      "--clip", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "is not a folder" in str(e.value.code)


def test_conversion_never_overwrites_a_folder_without_being_asked(tmp_path, converted, hf_mbart_dir, hf_mclip_dir,
                                                                  hf_xlmr_dir, hf_clip_dir, capsys):
    """--out holding anything (here a trained checkpoint's state.pt) is refused before any weight is read; with
    --overwrite the folder is replaced whole (nothing stale stays beside the new weights); --out naming a file is
    refused at once. The output is written aside and renamed into place: no temporary folder is left."""
    sources = ["--mbart", str(hf_mbart_dir), "--mclip", str(hf_mclip_dir), "--xlmr", str(hf_xlmr_dir),
               "--clip", str(hf_clip_dir)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "state.pt").write_bytes(b"a trained run's optimizer")
    with pytest.raises(SystemExit) as stop:
        weights.main(sources + ["--out", str(out)])
    assert "is not empty (it holds state.pt)" in str(stop.value.code) and "--overwrite" in str(stop.value.code)
    assert [p.name for p in out.iterdir()] == ["state.pt"]
    weights.main(sources + ["--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in converted.iterdir())
    assert load_file(out / weights.WEIGHTS_FILE).keys() == load_file(converted / weights.WEIGHTS_FILE).keys()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        weights.main(sources + ["--out", str(tmp_path / "file")])
    assert "is a file" in str(stop.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_more_beams_than_the_vocabulary_allows_fail_clearly(model, device):
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [5], lang_id=V - 51, device=device)
    beams = (V - 1) // 2 + 1  # one beam too many: 2 x beams + 1 candidates per step
    with pytest.raises(ValueError, match=f"at least {2 * beams + 1} tokens; this model has {V}: use at most {beams - 1}"):
        model.mbart.generate(ids, mask, num_beams=beams, max_new_tokens=3)


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe not utf-8", b"{\"cliptrans\": {\"vision\": 3}}", None])
def test_a_damaged_config_json_fails_clearly(tmp_path, converted, content):
    """config.json as a list, not UTF-8, with a section that describes no model, or a folder in its place."""
    folder = tmp_path / "weights"
    shutil.copytree(converted, folder)
    (folder / weights.CONFIG_FILE).unlink()
    if content is None:
        (folder / weights.CONFIG_FILE).mkdir()
    else:
        (folder / weights.CONFIG_FILE).write_bytes(content)
    with pytest.raises(weights.ConversionError, match=str(folder / weights.CONFIG_FILE).replace("\\", "\\\\")):
        weights.load(folder)


def test_a_full_disk_during_a_conversion_leaves_out_as_it_was(tmp_path, hf_mbart_dir, hf_mclip_dir, hf_xlmr_dir,
                                                             hf_clip_dir, monkeypatch):
    def full(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(weights, "save_file", full)
    with pytest.raises(SystemExit) as stop:
        weights.main(["--mbart", str(hf_mbart_dir), "--mclip", str(hf_mclip_dir), "--xlmr", str(hf_xlmr_dir),
                      "--clip", str(hf_clip_dir), "--out", str(tmp_path / "out")])
    assert f"cannot write {tmp_path / 'out'} (No space left on device)" in str(stop.value.code)
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary folder
