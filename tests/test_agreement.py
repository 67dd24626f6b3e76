"""Training and generation agree, and the search and the mapping network against independent references.

- The training forward (teacher forcing: `decoder_inputs`, `prefix_mask`, the decoder, the logits, and the loss of
  `CLIPTrans.forward` itself) against incremental decoding with the KV cache fed the same tokens: greedy and beam
  search, every beam at every step, from the image embedding and from the text embedding.
- CLIPTrans's beam search (with its prefix) against a beam search written here over full recomputation of the
  training layout, on a model with a 64-token vocabulary: the same tokens.
- The edges of the search against Hugging Face's `generate`: sentences that end exactly at `min_new_tokens`, one
  step before it, and at the last step.
- The mapping network of each kind against the official code's modules (`nn.Linear`, `nn.PReLU`,
  `nn.TransformerEncoderLayer`) holding the same weights.

The session's tiny Hugging Face models come from conftest.py; the converted ones from test_model.py's fixtures
(imported: run together with test_model.py, they are built once for each file)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import decoding
from cliptrans import (CLIPTrans, CLIPTransConfig, MappingConfig, MappingNetwork, MBartConfig, TextConfig,
                       VisionConfig, prefix_mask)
from conftest import assert_close
from test_model import hf_generate_with_eos_boost, ours_generate_with_eos_boost, padded_batch

EOS, PAD = 2, 1


# ----------------------------------------------------------------------------- helpers


def record_decoding(monkeypatch):
    """Spy on decoding.start_decoding, which CLIPTrans.generate reaches through decoding.generate: records what it
    is handed (the prompt CLIPTrans builds, its mask, the source's states), the logits of the first new token, and
    for every later step the logits of each row (B * beams) together with the history of tokens that row has
    decoded so far, followed through beam search's reorders of the cache."""
    rec = SimpleNamespace(steps=[])
    real = decoding.start_decoding

    def spy(mbart, memory, memory_mask, prompt, prompt_mask, beams, max_new_tokens, *args, **kw):
        logits, next_logits, cache = real(mbart, memory, memory_mask, prompt, prompt_mask, beams, max_new_tokens,
                                          *args, **kw)
        rec.memory, rec.memory_mask, rec.prompt, rec.prompt_mask = memory, memory_mask, prompt, prompt_mask
        rec.beams, rec.first = beams, logits.clone()
        history = [[] for _ in range(len(logits))]  # each row's tokens so far
        reorder = cache.reorder

        def spy_reorder(parent):  # (B, beams): row b * beams + j continues row b * beams + parent[b, j]
            rows = (torch.arange(parent.shape[0], device=parent.device)[:, None] * beams + parent).view(-1)
            history[:] = [list(history[r]) for r in rows.tolist()]
            reorder(parent)

        def spy_next_logits(step, tokens):  # tokens (B * beams,): the tokens chosen at `step`
            for row, t in zip(history, tokens.tolist()):
                row.append(t)
            out = next_logits(step, tokens)
            rec.steps.append((torch.tensor(history), out.clone()))  # (rows, step + 1), (rows, V')
            return out

        cache.reorder = spy_reorder
        return logits, spy_next_logits, cache

    monkeypatch.setattr(decoding, "start_decoding", spy)
    return rec, real


def teacher_forced_logits(model, clip, memory, memory_mask, targets, last=False):
    """The training forward's logits, before the loss: the decoder input of `decoder_inputs`
    (`</s> P1..Pp <lang> y1..`, from targets (R, L)), the prefix mask, the decoder, the output projection.
    Returns (R, 1 + P + L - 1, V), or the last position's alone, (R, V)."""
    P = model.config.mapping.prefix_len
    embeds, _ = model.decoder_inputs(clip, targets)
    h = model.mbart.decoder(embeds, memory, memory_mask, mask=prefix_mask(P, embeds.shape[1], embeds.device))
    return model.mbart.logits(h[:, -1] if last else h)


def replay(start_decoding, mbart, rec, tokens):
    """Incremental decoding with the KV cache (one row per sentence) of the prompt that generate built, fed
    `tokens` (B, L) one at a time. Returns (B, L, V): the logits at the prompt's last position, then after each
    token but the last."""
    V = mbart.config.vocab_size
    logits, next_logits, _ = start_decoding(mbart, rec.memory, rec.memory_mask, rec.prompt, rec.prompt_mask, 1,
                                            tokens.shape[1], use_cuda_graph=False)
    out = [logits[:, :V]]
    for i in range(tokens.shape[1] - 1):
        out.append(next_logits(i, tokens[:, i])[:, :V])
    return torch.stack(out, 1)


def clip_embedding(model, source, src_ids, device, seed):
    """A CLIP-space vector per sentence: an image's (stage 1, and --test_prefix image) or the source text's
    (stage 2), through the towers."""
    g = torch.Generator().manual_seed(seed)
    if source == "image":
        size = model.config.vision.image_size
        return model.encode_image(torch.randn(len(src_ids), 3, size, size, generator=g).to(device))
    lengths = [int(n) for n in torch.randint(3, 9, (len(src_ids),), generator=g)]
    ids, mask = padded_batch(model.config.text.vocab_size, lengths, seed=seed, device=device)
    return model.encode_text(ids, mask)


# ----------------------------------------------------------------------------- 1. training and generation agree


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("source", ["image", "text"])
def test_training_forward_equals_cached_decoding(peaked_pair, source, num_beams, device, monkeypatch):
    """What generation computes at every step is what training computes for the same tokens.

    Every row that greedy or beam search decodes (each beam, after each reorder of the cache) has at each step the
    logits of the training forward (`decoder_inputs`, `prefix_mask`, the decoder) on that row's history; the prompt's
    last position, the logits of the training layout's position P. And `CLIPTrans.forward`'s loss on the generated
    sentences is the cross-entropy of those logits: position 0 (`</s>` predicts the language) from the training
    layout, every target token from the cached decoding. A change to the prefix, its mask or the layout on one side
    only (training or generation) moves the logits by far more than the tolerance."""
    model = peaked_pair[1]
    c = model.config
    P, V, M = c.mapping.prefix_len, c.mbart.vocab_size, 8  # M: max_new_tokens
    src, src_mask = padded_batch(V, [7, 4, 6], lang_id=V - 51, seed=30, device=device)
    rec, start_decoding = record_decoding(monkeypatch)
    with torch.no_grad():
        clip = clip_embedding(model, source, src, device, seed=31)  # (B, D)
        out = model.generate(clip, src, src_mask, tgt_lang_id=V - 48, num_beams=num_beams, max_new_tokens=M,
                             use_cuda_graph=False)  # (B, n): `<lang> y1 .. </s>`, padded
        memory = model.mbart.encode(src, src_mask)  # (B, S, d), as the training forward computes it
        G = num_beams
        rows = lambda t: t.repeat_interleave(G, 0)  # noqa: E731  (B, ...) -> (B * G, ...): a sentence's beams
        assert rec.beams == G and len(rec.steps) >= 3, "the search ran several cached steps"
        # the prompt's last position (P): the logits of the first new token
        first = teacher_forced_logits(model, rows(clip), rows(memory), rows(src_mask),
                                      torch.full((len(src) * G, 1), PAD, device=device), last=True)  # (B G, V)
        assert_close(rec.first[:, :V], first, atol=1e-4, name="the prompt's last position (P)")
        # every later step: each row's history, teacher-forced (the target's last column is never read)
        for step, (history, logits) in enumerate(rec.steps):
            history = history.to(device)  # (B G, step + 1)
            targets = torch.cat([history, torch.full_like(history[:, :1], PAD)], 1)
            ref = teacher_forced_logits(model, rows(clip), rows(memory), rows(src_mask), targets, last=True)
            assert_close(logits[:, :V], ref, atol=1e-4, name=f"step {step}, every row")
        if G > 1:  # the beams went their own ways: the check saw more than one history per sentence
            assert any(len({tuple(h) for h in hist.view(len(src), G, -1)[0].tolist()}) > 1 for hist, _ in rec.steps)

        # the training loss itself (CLIPTrans.forward), on the generated sentences
        cached = replay(start_decoding, model.mbart, rec, out)  # (B, n, V): predicts out[:, i] at i >= 1
        tf = teacher_forced_logits(model, clip, memory, src_mask, out)  # (B, 1 + P + n - 1, V)
        assert_close(cached[:, 1:], tf[:, P + 1:], atol=1e-4, name="the generated sentences, teacher-forced")
        logits = torch.cat([tf[:, :1], cached[:, 1:]], 1)  # (B, n, V): position 0, then the targets
        labels = out.masked_fill(out == PAD, -100)
        ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        assert_close(model(clip, src, src_mask, out), ref, atol=2e-6, name="CLIPTrans.forward's loss")
        if G == 1:  # greedy: every token it chose is the argmax of the training forward's logits
            i = torch.arange(out.shape[1], device=device)[None]  # (1, n)
            end = (out == EOS).int().argmax(1, keepdim=True)  # (B, 1): where each sentence's </s> is
            chosen = (i >= 1) & (i <= end) & (i < M - 1)  # not the forced language, padding or the forced </s>
            assert chosen.sum() >= 4
            assert torch.equal(tf[:, P:].argmax(-1)[chosen], out[chosen])


# ----------------------------------------------------------------------------- 2. beam search, written again


def small_cliptrans(seed=0):
    """A CLIPTrans with a 64-token vocabulary and large random weights (std 0.3: peaked distributions, so that
    what it decodes depends on its input and near-ties are rare), the </s> row of the embedding three times as
    large (its logit varies more from one history to the next, so that sentences end at several lengths).
    Ids: <s> 0, <pad> 1, </s> 2, pieces 4..59, language codes 60..63."""
    cfg = CLIPTransConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp=64, embed_dim=16),
        text=TextConfig(vocab_size=64, width=32, layers=1, heads=2, mlp=64, max_positions=34, embed_dim=16),
        mbart=MBartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, heads=4, ffn=64,
                          max_positions=40),
        mapping=MappingConfig("mlp", 4))
    torch.manual_seed(seed)
    model = CLIPTrans(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
        model.mbart.shared.weight[EOS] *= 3
    return model.eval()


def direct_beam_search(log_probs, nb, max_new, min_new, forced_bos, length_penalty, early_stopping):
    """Beam search as transformers' `generate` does it (decoding.py's docstring), for one sentence, in plain
    Python over whole histories: no cache, no fixed-shape tensors.

    log_probs(histories) -> (len(histories), V) fp32 log-probabilities of the next token after each history.
    At every step each beam's continuations are scored by the sum of their log-probabilities, and the 2 nb best
    are the candidates. Those that end (with </s>, or at the last step) and rank among the first nb are finished
    hypotheses, scored by sum / (new tokens) ** length_penalty, and kept if among the nb best; the nb best of the
    others continue. A forced token replaces the distribution (log-probability 0, all else -inf): the language at
    the first step, </s> at the last (the later wins); </s> is -inf before min_new steps. The search ends when
    early_stopping is True and nb hypotheses have finished, or when the best running beam cannot beat the worst
    finished one: its score divided by (steps so far) ** length_penalty, or by max_new ** length_penalty with
    early_stopping "never" (and a positive penalty). Returns the best hypothesis: its tokens, </s> last."""
    beams = [[] for _ in range(nb)]
    scores = torch.tensor([0.0] + [-1e9] * (nb - 1))  # at the first step all beams are equal: expand the first
    finished = []  # (score, tokens), best first, at most nb
    for step in range(max_new):
        logp = log_probs(beams)  # (nb, V)
        V = logp.shape[1]
        forced = EOS if step == max_new - 1 else forced_bos if step == 0 else None
        if forced is not None:
            logp = torch.full_like(logp, -math.inf)
            logp[:, forced] = 0.0
        elif step < min_new:
            logp[:, EOS] = -math.inf
        total, index = (logp + scores[:, None]).view(-1).topk(2 * nb)  # the 2 nb best continuations
        cands = [(total[r], beams[i // V] + [i % V]) for r, i in enumerate(index.tolist())]
        ends = [tokens[-1] == EOS or step == max_new - 1 for _, tokens in cands]
        full = early_stopping is True and len(finished) == nb  # (as it stood before this step)
        if not full:
            finished += [(s / (step + 1) ** length_penalty, tokens)
                         for r, (s, tokens) in enumerate(cands[:nb]) if ends[r]]
            finished = sorted(finished, key=lambda f: -f[0])[:nb]
        alive = torch.stack([s - 1e9 * e for (s, _), e in zip(cands, ends)])  # ended candidates last
        keep = alive.topk(nb).indices.tolist()
        beams, scores = [cands[r][1] for r in keep], alive[keep]
        if early_stopping is True and len(finished) == nb:
            break
        n = max_new if early_stopping == "never" and length_penalty > 0 else step + 1
        if len(finished) == nb and scores[0] / n ** length_penalty <= finished[-1][0]:
            break  # no running beam can beat the worst finished hypothesis
    return finished[0][1]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,min_new", [
    (1, 1.0, True, 0), (3, 1.0, True, 0), (3, 1.0, True, 4), (4, 0.6, False, 2), (3, 2.0, "never", 0)])
def test_beam_search_equals_a_direct_beam_search(num_beams, length_penalty, early_stopping, min_new):
    """CLIPTrans.generate (the prompt `</s> P1..P4`, the KV cache, decoding.py's tensors of fixed shapes) against
    `direct_beam_search`, whose log-probabilities come from the training layout (`decoder_inputs`) recomputed
    whole for every history: token for token the same, for sentences that end at several lengths. With one beam,
    decoding.py's greedy search is checked against it (beam search with one beam decodes greedily)."""
    model = small_cliptrans()
    lang = 60  # a language code of the small vocabulary
    g = torch.Generator().manual_seed(40)
    src, src_mask = padded_batch(120, [7, 4, 6, 5, 8, 3], lang_id=61, seed=41)  # pieces 4..59
    clip = torch.randn(6, 16, generator=g)
    args = dict(num_beams=num_beams, max_new_tokens=10, min_new_tokens=min_new, length_penalty=length_penalty,
                early_stopping=early_stopping)
    with torch.no_grad():
        # the smallest raise of the </s> logit at which the sentences end at several lengths
        for boost in torch.arange(0.0, 10.0, 0.5).tolist():
            model.mbart.final_logits_bias[EOS] = boost
            ours = model.generate(clip, src, src_mask, tgt_lang_id=lang, **args)
            if len(set((ours != PAD).sum(1).tolist())) > 2:
                break
        else:
            raise AssertionError("no </s> bias makes these sentences end at three lengths or more")
        memory = model.mbart.encode(src, src_mask)
        for b in range(len(src)):
            def log_probs(histories):  # the training forward, the whole decoder on each whole history
                targets = torch.tensor([h + [PAD] for h in histories])  # (the last column is never read)
                rows = len(histories)
                logits = teacher_forced_logits(model, clip[b:b + 1].expand(rows, -1), memory[b:b + 1].expand(
                    rows, -1, -1), src_mask[b:b + 1].expand(rows, -1), targets, last=True)
                return F.log_softmax(logits.float(), -1)

            ref = direct_beam_search(log_probs, num_beams, 10, min_new, lang, length_penalty, early_stopping)
            row = ours[b][ours[b] != PAD].tolist()
            assert row == ref, f"sentence {b}: ours {row}, direct beam search {ref}"
    assert ours[:, 0].eq(lang).all() and ((ours != PAD).sum(1) >= min_new + 1).all()
    if num_beams > 1:  # and the beams found what greedy search does not (or the test would not tell them apart)
        greedy = model.generate(clip, src, src_mask, tgt_lang_id=lang, **{**args, "num_beams": 1})
        assert greedy.shape != ours.shape or not torch.equal(greedy, ours)


# ----------------------------------------------------------------------------- 3. the search's edges


def end_steps(out):
    """(B, n) new tokens, generate's output -> (B,) the step (0-based) at which each sentence's </s> was chosen."""
    assert (out == EOS).any(1).all(), "every sentence ends with </s>"
    return (out == EOS).int().argmax(1)


def boosts(model, ids, mask, accept, **args):
    """The raises of the </s> logit (0 to 10, steps of 1) at which our search's end steps (B,) pass `accept`,
    with those end steps."""
    for boost in range(10):
        ends = end_steps(ours_generate_with_eos_boost(model, float(boost), ids, mask, **args))
        if accept(ends):
            yield float(boost), ends


def ends_after_another(ends, lo=2, hi=10):
    """The steps in [lo, hi) at which a sentence ends after another sentence has ended."""
    return [k for k in sorted(set(ends.tolist())) if lo <= k < hi and (ends < k).any()]


def ends_between_others(ends, lo=2):
    """The steps from lo at which a sentence ends after another one has ended and before a third ends."""
    return [k for k in sorted(set(ends.tolist())) if k >= lo and (ends < k).any() and (ends > k).any()]


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("edge", ["min_new_tokens", "last_step"])
def test_search_edges_equal_hf(peaked_pair, num_beams, edge, device):
    """Sentences that end exactly where a rule starts or stops, against Hugging Face's `generate`, token for token.

    `</s>` raised (final_logits_bias) until, without any minimum, the sentences end at several steps. Then
    - min_new_tokens: with min_new_tokens = k, a sentence ends exactly at step k, the first at which `</s>` is
      allowed (and another sentence had ended before k without the minimum); with k + 1, such a sentence would
      end at min_new_tokens - 1 and must go on;
    - last_step: max_new_tokens = M so that a sentence's own `</s>` falls on the last step, where `</s>` is also
      forced on a sentence still running, while a third has ended before; then min_new_tokens M - 1 (`</s>` first
      allowed at the last step) and M (banned at every step, but forced at the last: the forced token wins).
    Each case is checked to hit its boundary in Hugging Face's output, and ours is compared with it."""
    hf_mbart, model = peaked_pair
    V = model.config.mbart.vocab_size
    ids, mask = padded_batch(V, [9, 6, 4, 7, 5, 8, 6, 7], lang_id=V - 51, seed=51, device=device)
    args = dict(num_beams=num_beams, tgt_lang_id=V - 48, early_stopping=True, length_penalty=1.0)

    def both(boost, **kw):  # Hugging Face's tokens and ours, on the same boost
        ref = hf_generate_with_eos_boost(hf_mbart, boost, input_ids=ids, attention_mask=mask, **args, **kw)
        ours = ours_generate_with_eos_boost(model, boost, ids, mask, **args, **kw)
        assert torch.equal(ours, ref), f"{kw}\nours:\n{ours}\nhf:\n{ref}"
        return end_steps(ref)

    if edge == "min_new_tokens":
        # k: a step at which a sentence ends without a minimum, after another sentence has ended; with
        # min_new_tokens k, is there still one that ends exactly at k? (beam search may now find other beams)
        found = ((boost, k) for boost, free in boosts(model, ids, mask, ends_after_another, max_new_tokens=12,
                                                      **args)
                 for k in ends_after_another(free)
                 if (ends := both(boost, max_new_tokens=12, min_new_tokens=k)).min() >= k and (ends == k).any())
        boost, k = next(found, (None, None))
        assert k is not None, "no sentence ends exactly at min_new_tokens"
        ends = both(boost, max_new_tokens=12, min_new_tokens=k + 1)  # those would end at min_new_tokens - 1
        assert ends.min() >= k + 1
    else:
        boost, free = next(boosts(model, ids, mask, ends_between_others, max_new_tokens=12, **args))
        M = ends_between_others(free)[0] + 1
        ends = both(boost, max_new_tokens=M)
        assert (ends < M - 1).any() and (ends == M - 1).sum() >= 2, "own and forced </s> at the last step"
        for m in (M - 1, M):
            ends = both(boost, max_new_tokens=M, min_new_tokens=m)
            assert (ends == M - 1).all(), f"min_new_tokens {m}: every sentence ends at the last step"


# ----------------------------------------------------------------------------- 4. the mapping network


def official_mapping(kind, clip_dim, d, P):
    """The official CLIPTrans code's mapping networks (src/models/adapters.py), built from PyTorch's modules:
    MLPAdapter, HiddenMLPAdapter and TransformerAdapter with one nn.TransformerEncoderLayer, as MappingNetwork has
    (2 heads, feed-forward d // 3, ReLU, dropout 0.1, post-LN: PyTorch's defaults). Returns (module, forward:
    (B, D) -> (B, P, d))."""
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(clip_dim, P * d), nn.PReLU())
        return m, lambda x: m(x).view(-1, P, d)
    if kind == "hidden_mlp":
        m = nn.Sequential(nn.Linear(clip_dim, d), nn.ReLU(), nn.Linear(d, P * d), nn.PReLU())
        return m, lambda x: m(x).view(-1, P, d)
    m = nn.ModuleDict(dict(projector=nn.Linear(clip_dim, P * d), layer=nn.TransformerEncoderLayer(
        d, nhead=2, dim_feedforward=d // 3, dropout=0.1, activation="relu", batch_first=True)))
    return m, lambda x: m["layer"](m["projector"](x).view(-1, P, d))


def copy_into_official(ours, official, kind):
    """Our mapping network's weights into the official modules, parameter by parameter, strictly: every official
    parameter gets one of ours and none of ours is left over."""
    if kind in ("mlp", "hidden_mlp"):  # the layers with parameters, in order: Linear (, Linear), PReLU
        theirs = [(i, m) for i, m in enumerate(official) if list(m.parameters())]
        mine = [m for m in ours.net if list(m.parameters())]
        assert [type(m) for _, m in theirs] == [type(m) for m in mine], f"layers: {list(ours.net)}"
        state = {f"{i}.{n}": p for (i, _), m in zip(theirs, mine) for n, p in m.named_parameters()}
    else:  # our fused q, k, v rows are in_proj's order (q, k, v)
        b = ours.block
        state = {"projector.weight": ours.net.weight, "projector.bias": ours.net.bias,
                 "layer.self_attn.in_proj_weight": b.attn.qkv.weight, "layer.self_attn.in_proj_bias": b.attn.qkv.bias,
                 "layer.self_attn.out_proj.weight": b.attn.out.weight, "layer.self_attn.out_proj.bias": b.attn.out.bias,
                 "layer.linear1.weight": b.mlp.fc1.weight, "layer.linear1.bias": b.mlp.fc1.bias,
                 "layer.linear2.weight": b.mlp.fc2.weight, "layer.linear2.bias": b.mlp.fc2.bias,
                 "layer.norm1.weight": b.ln_attn.weight, "layer.norm1.bias": b.ln_attn.bias,
                 "layer.norm2.weight": b.ln_mlp.weight, "layer.norm2.bias": b.ln_mlp.bias}
    official.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in official.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("kind", ["mlp", "hidden_mlp", "transformer"])
def test_mapping_network_equals_the_official_modules(kind):
    """MappingNetwork of each kind against the official code's modules holding the same weights, in eval mode:
    the same prefix vectors. Every weight random (LayerNorms and PReLU slopes too: defaults hide swapped or
    missing parts), inputs of both signs (PReLU's negative slope is used), the same number of parameters."""
    D, d, P = 16, 24, 5  # clip dim, decoder width (divisible by 2 heads; feed-forward 8), prefix length
    torch.manual_seed(60)
    ours = MappingNetwork(MappingConfig(kind, P), D, d)
    with torch.no_grad():
        for m in ours.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, nn.LayerNorm) and name == "weight":
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif isinstance(m, nn.PReLU):
                    p.fill_(0.6)  # not the default 0.25
                else:
                    p.copy_(0.3 * torch.randn_like(p))
    official, forward = official_mapping(kind, D, d, P)
    copy_into_official(ours, official, kind)
    ours.eval(), official.eval()
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(61)) * 2  # (B, D)
    with torch.no_grad():
        ref = forward(x)  # (B, P, d)
        out = ours(x)
        assert (ref < 0).float().mean() > 0.2, "outputs of both signs (in the mlps: PReLU's slope is used)"
        assert_close(out, ref, atol=1e-5, name=f"{kind} prefix")


@pytest.mark.parametrize("kind", ["mlp", "hidden_mlp", "transformer"])
def test_prefix_length_zero_is_no_mapping_network(kind):
    """prefix_len 0, the text-only baseline: no parameters, a (B, 0, d) prefix in the input's dtype, and the
    training layout is mBART's own: decoder input `</s> <lang> y1..yn` (the embedded target shifted right), labels
    `<lang> y1..yn </s>` with the padding at -100."""
    net = MappingNetwork(MappingConfig(kind, 0), 16, 24)
    assert list(net.parameters()) == []
    x = torch.randn(3, 16)
    assert net(x).shape == (3, 0, 24) and net(x).dtype == x.dtype
    assert net(x.double()).dtype == torch.float64
    model = small_cliptrans()
    model.new_mapping(MappingConfig(kind, 0))
    tgt, _ = padded_batch(120, [5, 3], lang_id=60, seed=62)  # (2, 5) `<lang> y.. </s>`, padded
    embeds, labels = model.decoder_inputs(torch.randn(2, 16), tgt)
    shifted = torch.cat([torch.full((2, 1), EOS), tgt[:, :-1]], 1)  # `</s> <lang> y1..`
    assert torch.equal(embeds, model.mbart.embed_tokens(shifted))
    assert torch.equal(labels, tgt.masked_fill(tgt == PAD, -100))
