"""
Greedy and beam search for mBART-50's decoder, with Hugging Face's semantics: on the same weights, the same
tokens as `MBartForConditionalGeneration.generate` (transformers/generation/utils.py; tests/test_model.py).

Beam search in plain words. Greedy search takes the most likely next token at every step. Beam search keeps
the `num_beams` most likely partial sentences ("beams") instead of one. At every step each beam proposes its
possible next tokens; every continuation of every beam is scored by the sum of its tokens' log-probabilities;
the best `num_beams` continuations that did not just end become the new beams. A continuation that ends with
`</s>` is a finished hypothesis, scored by its log-probability divided by its length ** length_penalty, and
kept if it is among the `num_beams` best finished ones so far. The search stops when no running beam can still
beat them (or after max_new_tokens), and returns the best finished hypothesis. As transformers does: 2 x
num_beams candidates per step, so that num_beams survive even if num_beams of them just ended; a forced token
(the target language first, `</s>` at the last step) replaces the whole distribution; `min_new_tokens` bans
`</s>` before it.

The decoder runs one token at a time with a KV cache (`Cache`): a step computes only its new position and
attends the keys and values kept from the earlier ones. The layers' math is cliptrans.py's alone (its `Attention`
is handed the cache); the search, the cache's layout and the speed-ups are this file's.

Reading order: `generate`; `greedy_search`, `beam_search` and its `keep_finished` (the algorithms);
`start_decoding` and `Cache` (the decoder one step at a time); then the speed-ups, each marked `# speed:` where it
enters, none changing a token: beams share one copy of their source and prompt and a reorder moves no keys or
values (`Cache`); a chunked top-k, compiled on CUDA (`beam_candidates`); the step's attention kernel
(`matmul_attention`); a decoding step replayed as one CUDA graph (`cuda_graph`).
"""

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

# -----------------------------------------------------------------------------
# The search.


@torch.no_grad()
def generate(mbart, memory, memory_mask, prompt, prompt_mask=None, num_beams=5, max_new_tokens=60,
             min_new_tokens=0, forced_bos_token_id=None, forced_eos=True, length_penalty=1.0,
             early_stopping=True, check_every=4, use_cuda_graph=True, compile_scores=None, attention=None,
             topk_chunk=64):
    """Continue the decoder prompt `prompt` (B, P, d), already embedded (`</s>` for mBART, `</s> P1..P10` for
    CLIPTrans; `prompt_mask` its (P, P) self-attention mask, or None: causal), by up to `max_new_tokens`
    tokens, attending `memory` (B, S, d), the encoder's output, and its padding mask `memory_mask` (B, S).

    num_beams 1 is greedy search. length_penalty and early_stopping (True, False: transformers' heuristic, or
    "never") as in transformers. The stopping test needs the GPU's answer, so it runs every `check_every` steps
    only (finished sentences are masked: the steps after them change nothing). Speed, none changing a token:
    use_cuda_graph (on CUDA, each step replayed as a CUDA graph); compile_scores (beam search's log-softmax and
    top-k compiled; None: on CUDA only, where beam-5 search ran 1.3x faster on an H100); attention (None: SDPA's
    choice, a list of SDPBackend, or "matmul": `matmul_attention`); topk_chunk (0: torch.topk).
    Returns the new tokens (B, n), padded with pad_id after `</s>`."""
    c = mbart.config
    P = prompt.shape[1]
    check_search(c, P, num_beams, max_new_tokens)
    # transformers' forced tokens: the target language first, </s> at the last step (the later one wins)
    forced = {} if forced_bos_token_id is None else {0: forced_bos_token_id}
    if forced_eos:
        forced[max_new_tokens - 1] = c.eos_id
    logits, next_logits, cache = start_decoding(mbart, memory, memory_mask, prompt, prompt_mask, num_beams,
                                                max_new_tokens, attention, use_cuda_graph)
    if num_beams == 1:
        return greedy_search(logits, next_logits, c.eos_id, c.pad_id, max_new_tokens, min_new_tokens, forced,
                             check_every)
    if compile_scores is None:
        compile_scores = prompt.device.type == "cuda"
    candidates = torch.compile(beam_candidates) if compile_scores else beam_candidates  # speed: compiled
    return beam_search(logits, next_logits, cache, c.eos_id, c.pad_id, num_beams, max_new_tokens,
                       min_new_tokens, forced, length_penalty, early_stopping, check_every,
                       lambda logits, k, banned: candidates(logits, k, banned, topk_chunk))


def check_search(c, prompt_len, num_beams, max_new_tokens):
    """A search that can run on mBART `c` (its config), or a ValueError that says what to ask for instead."""
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams={num_beams}, max_new_tokens={max_new_tokens}: expected at least 1 of "
                         f"each")
    if num_beams > 1 and 2 * num_beams + 1 > c.vocab_size:  # each step keeps 2 x num_beams (+1) candidates
        raise ValueError(f"num_beams={num_beams} needs a vocabulary of at least {2 * num_beams + 1} tokens; "
                         f"this model has {c.vocab_size}: use at most {(c.vocab_size - 1) // 2} beams")
    if prompt_len + max_new_tokens > c.max_positions:
        raise ValueError(f"{prompt_len} prompt positions + max_new_tokens={max_new_tokens} exceed mBART's "
                         f"{c.max_positions}: max_new_tokens can be at most {c.max_positions - prompt_len}")


def greedy_search(logits, next_logits, eos_id, pad_id, max_new_tokens, min_new_tokens, forced, check_every):
    """logits (B, V) of the first new token; next_logits(step, tokens) -> the logits after `tokens` (B,), the
    tokens chosen at `step`. Returns (B, n) tokens, padded after `</s>`, as long as the longest sentence."""
    B, dev = logits.shape[0], logits.device
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    running = torch.ones(B, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        # transformers' processors, in its order: a forced token replaces the distribution; `</s>` banned
        if step in forced:
            tok = torch.full((B,), forced[step], device=dev)
        else:
            if step < min_new_tokens:
                logits[:, eos_id] = -math.inf  # (in place: the logits are not used again)
            tok = logits.argmax(-1)
        tok = torch.where(running, tok, pad_id)  # finished sentences emit padding
        out[:, step] = tok
        running = running & (tok != eos_id)
        if step + 1 < max_new_tokens:
            if (step + 1) % check_every == 0 and not running.any():
                break
            logits = next_logits(step, tok)
    # Hugging Face stops when every sentence has ended: the output is as long as the longest sentence.
    ended = out == eos_id
    lengths = torch.where(ended.any(1), ended.int().argmax(1) + 1, max_new_tokens)
    return out[:, :int(lengths.max())]


def beam_search(logits, next_logits, cache, eos_id, pad_id, nb, max_new_tokens, min_new_tokens, forced,
                length_penalty, early_stopping, check_every, candidates):
    """logits (B * nb, V) of the first new token, the nb rows of a sentence next to each other; next_logits as
    in greedy_search; cache.reorder(parent) makes beam j continue the history of beam parent[b, j];
    candidates(logits, k, banned) -> the k best (log-probabilities, tokens) of each row, `banned` at -inf.
    Running beams (B, nb) and finished hypotheses (B, nb) live in tensors of fixed shapes: no host sync.
    Returns (B, n) tokens: the best finished hypothesis of each sentence, padded."""
    B, dev = logits.shape[0] // nb, logits.device
    k = 2 * nb  # keep 2 nb candidates so nb survive even if nb of them just ended
    seqs = torch.full((B, nb, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = -1e9  # at the first step all beams are equal: expand only the first
    fin = (torch.full((B, nb), -1e9, device=dev), seqs.clone(), torch.zeros(B, nb, dtype=torch.long, device=dev),
           torch.zeros(B, nb, dtype=torch.bool, device=dev))  # the finished hypotheses: see keep_finished
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # could a running beam still beat a finished one?
    top_nb = torch.arange(k, device=dev) < nb
    for step in range(max_new_tokens):
        # 1) each beam's 2 nb best continuations. The 2 nb best of all nb x V continuations are among them: a
        # top-k per beam, then over the nb x 2 nb survivors (the same set as transformers' top-k over nb x V).
        if step not in forced:  # (B * nb, 2 nb) each
            top_logp, top_tok = candidates(logits, k, eos_id if step < min_new_tokens else None)
        else:  # a forced token replaces the whole distribution: log-probability 0, every other candidate -inf
            top_logp = torch.full((B * nb, k), -math.inf, device=dev)
            top_logp[:, 0] = 0.0
            top_tok = torch.full((B * nb, k), forced[step], device=dev)
        scores = top_logp.view(B, nb, k) + run_scores[:, :, None]  # log-probabilities of whole sequences
        cand_scores, cand = torch.topk(scores.view(B, nb * k), k)  # (B, 2 nb)
        cand_beam, cand_tok = cand // k, torch.take_along_dim(top_tok.view(B, nb * k), cand, dim=1)
        cand_seqs = torch.take_along_dim(seqs, cand_beam[:, :, None], dim=1)
        cand_seqs[:, :, step] = cand_tok
        ended = (cand_tok == eos_id) | (step == max_new_tokens - 1)  # (B, 2 nb)

        # 2) the nb best candidates that did not end continue
        alive = cand_scores + ended.float() * -1e9
        keep = torch.topk(alive, nb)[1]
        seqs = torch.take_along_dim(cand_seqs, keep[:, :, None], dim=1)
        run_scores = torch.take_along_dim(alive, keep, dim=1)
        parent = torch.take_along_dim(cand_beam, keep, dim=1)

        # 3) candidates among the top nb that ended compete with the finished hypotheses
        just_ended = ended & top_nb[None, :]
        fin = keep_finished(fin, cand_scores, cand_seqs, just_ended, step, length_penalty, early_stopping, open_)
        fin_scores, fin_seqs, fin_lens, fin_done = fin

        # 4) can a running beam still win? transformers' heuristic (early_stopping=False) or its exact bound
        # ("never"); early_stopping=True: a sentence is done when it has nb finished hypotheses
        n = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else step + 1
        best_possible = run_scores[:, :1] / (n ** length_penalty)
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True)[0], -1e9)
        open_ = open_ & (best_possible > worst).any(-1, keepdim=True)

        # 5) the next step's logits, each beam after its parent's history
        if step + 1 < max_new_tokens:
            if (step + 1) % check_every == 0 and (~open_.any() | (fin_done.all() & (early_stopping is True))):
                break
            cache.reorder(parent)  # parents are beams of the same sentence
            logits = next_logits(step, seqs[:, :, step].reshape(-1))
    # the best finished hypothesis of each sentence
    out = torch.where(torch.arange(max_new_tokens, device=dev) < fin_lens[:, :1], fin_seqs[:, 0], pad_id)
    return out[:, :int(fin_lens[:, 0].max())]


def keep_finished(fin, cand_scores, cand_seqs, just_ended, step, length_penalty, early_stopping, open_):
    """Beam search's finished hypotheses after `step`: fin = (scores (B, nb), tokens (B, nb, max_new_tokens),
    lengths (B, nb), done (B, nb): whether the place holds a hypothesis yet). The candidates that just ended
    (`just_ended`, (B, 2 nb); their log-probabilities `cand_scores`, their tokens `cand_seqs`) are scored by
    log-probability / length ** length_penalty and join them; the nb best stay. A sentence takes no more once
    it can no longer change (`open_` (B, 1) False), or with early_stopping True once it has nb."""
    fin_scores, fin_seqs, fin_lens, fin_done = fin
    new = cand_scores / ((step + 1) ** length_penalty)
    new = new + (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
    new = new + (~open_).float() * -1e9
    new = new + (~just_ended) * -1e9
    merged = torch.cat([fin_scores, new], dim=1)
    best = torch.topk(merged, fin_scores.shape[1])[1]  # (B, nb): the nb best of the old and the new
    lens = torch.cat([fin_lens, torch.full_like(just_ended, step + 1, dtype=torch.long)], 1)
    return (torch.take_along_dim(merged, best, dim=1),
            torch.take_along_dim(torch.cat([fin_seqs, cand_seqs], 1), best[:, :, None], dim=1),
            torch.take_along_dim(lens, best, dim=1),
            torch.take_along_dim(torch.cat([fin_done, just_ended], 1), best, dim=1))


# -----------------------------------------------------------------------------
# The model's decoder, one step at a time, through a cache.


def start_decoding(mbart, memory, memory_mask, prompt, prompt_mask, beams, max_new_tokens, attention=None,
                   use_cuda_graph=True):
    """Run the prompt (B, P, d) through the model's decoder into a new cache, once per sentence (not per beam).
    Returns the logits of the first new token (B * beams, V'), each sentence's `beams` rows next to each
    other; `next_logits(step, tokens)`: the logits after `tokens` (B * beams,), the tokens chosen at `step`;
    and the cache. V' >= V: the vocabulary padded with -inf logits that are never chosen."""
    decoder, (B, P, _), dev = mbart.decoder, prompt.shape, prompt.device
    cache = Cache(P + max_new_tokens, beams, attention)
    h = decoder(prompt, memory, memory_mask, prompt_mask, cache=cache)  # (B, P, d)

    # speed: MBart's output projection cast once for the whole search and padded to a multiple of 64 rows: 250054
    # is not a multiple of 8, and misaligned rows of logits keep the GPU's matrix units off their fast paths.
    weight, bias = mbart.output_projection()  # (V, d), (V,)
    autocast = torch.is_autocast_enabled(dev.type)
    dtype = torch.get_autocast_dtype(dev.type) if autocast else weight.dtype
    V = weight.shape[0]
    weight = F.pad(weight.to(dtype), (0, 0, 0, -V % 64))  # (also a multiple of the top-k chunks)
    bias = F.pad(bias.to(dtype), (0, -V % 64), value=-math.inf)

    def project(h):  # (rows, d) -> logits (rows, V'), in the autocast dtype like Hugging Face's
        return F.linear(h.to(dtype), weight, bias)

    # A decoding step reads its tokens and position from tensors that stay in place (a CUDA graph replays it).
    token_in = torch.zeros(B * beams, dtype=torch.long, device=dev)
    pos = torch.full((), P, dtype=torch.long, device=dev)

    def step():
        with sdpa_kernel(attention) if isinstance(attention, list) else nullcontext():
            x = mbart.embed_tokens(token_in[:, None])  # (B * beams, 1, d)
            mask = cache.begin_step(pos)  # (B, 1, beams, beams * max_len): each beam its own history
            return project(decoder(x, memory, memory_mask, mask, start=pos, cache=cache)[:, -1])

    # speed: step() runs max_new_tokens - 1 times: the first records a CUDA graph, the others replay it
    if use_cuda_graph and dev.type == "cuda" and max_new_tokens > 2:
        step = cuda_graph(step, decoder)

    def next_logits(i, tokens):
        token_in.copy_(tokens)
        pos.fill_(P + i)
        return step()

    # Only the prompt's last position predicts the first token, the same for all the beams of a sentence.
    return project(h[:, -1].repeat_interleave(beams, dim=0)), next_logits, cache


class Cache:
    """What the decoder keeps between decoding steps, keyed by the attention module (cliptrans.Attention) that
    `update`s it with its new keys and values (self-attention) or takes the source's from `memory` (cross).

    Self-attention: a buffer (2, B, H, beams, max_len, Dh) per layer, allocated once and filled position by
    position. The prompt, the same for every beam, is written once, into slot 0, at an int position; a decoding
    step (`begin_step`) writes beam j's new token into slot j at a position held in a device tensor, and reads all
    the slots of its sentence: the shapes never change, so a CUDA graph can replay it.
    speed: beam search never moves keys or values. owner[b, j, t] is the slot that holds position t of beam j's
    history (-1: not written yet); a reorder gathers these B x beams x max_len integers instead of the keys and
    values (up to 1 GB of bf16 at the paper's sizes), and the beams of a sentence attend its slots together, as
    one row, each masked to its own history. Cross-attention: the source's keys and values, (B, H, S, Dh) each,
    computed at the first call, one copy per sentence. attention: generate's ("matmul": `matmul_attention`).
    """

    def __init__(self, max_len, beams=1, attention=None):
        self.max_len, self.beams, self.attention = max_len, beams, attention
        self.kv, self.cross, self.owner = {}, {}, None
        self.pos = 0  # where `update` writes: an int for the prompt, a 0-d device tensor for a step

    def update(self, attn, k, v):
        """k, v: the new keys and values of the self-attention `attn`. At an int position, (B, H, T, Dh) for T
        positions of each sentence, into slot 0; returns that slot's keys and values so far, (B, H, pos + T, Dh)
        each. At a tensor position, (B * beams, H, 1, Dh), each beam's into its own slot; returns every slot,
        (B, H, beams * max_len, Dh) each: the keys of slot s at rows s * max_len ..."""
        if attn not in self.kv:
            B, H, _, Dh = k.shape
            # zeros, not empty: masked positions get weight 0, and 0 * (garbage NaN) would still be NaN
            self.kv[attn] = k.new_zeros(2, B, H, self.beams, self.max_len, Dh)
            if self.owner is None:
                self.owner = torch.full((B, self.beams, self.max_len), -1, dtype=torch.long, device=k.device)
        keys, values = self.kv[attn]  # (B, H, beams, max_len, Dh) each, views
        if isinstance(self.pos, int):
            start, end = self.pos, self.pos + k.shape[2]
            keys[:, :, 0, start:end], values[:, :, 0, start:end] = k, v
            self.owner[:, :, start:end] = 0  # every beam's history starts with the prompt in slot 0
            return keys[:, :, 0, :end], values[:, :, 0, :end]
        B, H, beams, _, Dh = keys.shape
        k, v = (t.view(B, beams, H, 1, Dh).transpose(1, 2) for t in (k, v))  # (B, H, beams, 1, Dh)
        keys.index_copy_(3, self.pos.view(1), k)
        values.index_copy_(3, self.pos.view(1), v)
        return keys.flatten(2, 3), values.flatten(2, 3)

    def memory(self, attn, memory):
        """The cross-attention `attn`'s keys and values of the source, (B, H, S, Dh) each: projected by the module
        itself at the first call, then kept."""
        if attn not in self.cross:
            self.cross[attn] = tuple(t.contiguous() for t in attn.project_memory(memory))
        return self.cross[attn]

    def begin_step(self, pos):
        """Before a decoding step at `pos` (a device tensor): beam j's token at `pos` goes into slot j. Returns
        the step's self-attention mask, bool (B, 1, beams, beams * max_len): beam j may attend slot s's position
        t when that is where position t of its history lies, which also masks the positions not written yet."""
        self.pos = pos
        B, beams, _ = self.owner.shape
        slots = torch.arange(beams, device=self.owner.device)
        self.owner.index_copy_(2, pos.view(1), slots.view(1, beams, 1).expand(B, beams, 1))
        return (self.owner[:, :, None, :] == slots[:, None]).flatten(2)[:, None]

    def reorder(self, parent):
        """Beam j of sentence b continues the hypothesis of that sentence's beam parent[b, j], (B, beams): it
        takes that beam's history. In place: a recorded CUDA graph reads `owner` where it is."""
        self.owner.copy_(self.owner.gather(1, parent[:, :, None].expand_as(self.owner)))

    def attend(self, q, k, v, mask=None, causal=False):
        """q (rows, T, C) against k, v (B, H, L, Dh), rows = G x B -> (rows, T, C). speed: the G rows of a sentence
        (its beams, next to each other) share one copy of its keys and values (the source, or the cache slots of
        all its beams), and their G x T queries attend them together, as one row: (B, H, G * T, Dh)."""
        rows, T, C = q.shape
        B, H = k.shape[:2]
        q = q.reshape(B, rows // B * T, H, C // H).transpose(1, 2)  # (B, H, G * T, Dh)
        if self.attention == "matmul" and T == 1:
            y = matmul_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return y.transpose(1, 2).reshape(rows, T, C)


# -----------------------------------------------------------------------------
# Speed-ups. None changes a token; each has a test against the plain computation.


def topk_by_chunks(x, k, chunk=64):
    """torch.topk(x, k) over the last dimension of (R, V) rows of a vocabulary: the k largest entries of a row
    lie in the k chunks with the largest maxima, so one pass of maxima over the row replaces the several
    passes of a selection over all V entries. V must be a multiple of `chunk` (chunk=0: torch.topk itself).
    Returns (values, indices)."""
    R, V = x.shape
    if chunk == 0 or V // chunk < k:  # or a small vocabulary: fewer chunks than entries wanted
        return torch.topk(x, k)
    chunks = x.view(R, V // chunk, chunk)
    best = torch.topk(chunks.amax(-1), k).indices  # (R, k): the chunks that hold the k largest entries
    cand = torch.take_along_dim(chunks, best[:, :, None], dim=1).view(R, k * chunk)
    values, i = torch.topk(cand, k)
    return values, torch.gather(best, 1, i // chunk) * chunk + i % chunk


def beam_candidates(logits, k, banned=None, chunk=64):
    """Beam search's candidates from each row of logits (R, V): the k tokens of highest fp32 log-probability
    (transformers' scores, log_softmax first) and those log-probabilities, with token `banned` (or None) at
    -inf. A row's log-softmax keeps its order, so the tokens are found in the logits (under bf16 autocast,
    half the bytes of the fp32 log-probabilities), one more than k in case `banned` is among them.
    Returns (log-probabilities (R, k), tokens (R, k))."""
    logp = F.log_softmax(logits, -1, dtype=torch.float32)  # (R, V)
    tok = topk_by_chunks(logits, k + (banned is not None), chunk)[1]
    top = logp.gather(1, tok)
    if banned is not None:
        top, i = torch.topk(top.masked_fill(tok == banned, -math.inf), k)
        tok = tok.gather(1, i)
    return top, tok


def matmul_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(Dh)) v as two batched matrix products, for decoding (a few queries per row), with
    the scores in fp32 as the fused kernels keep them. q (B, H, T, Dh); k, v (B, H, L, Dh) contiguous; mask
    bool, True = may attend, broadcast to (B, H, T, L), at least one key per query."""
    B, H, T, Dh = q.shape
    L = k.shape[2]
    q, kt = q.reshape(B * H, T, Dh), k.view(B * H, L, Dh).transpose(1, 2)
    if q.is_cuda and q.dtype != torch.float32:
        s = torch.bmm(q, kt, out_dtype=torch.float32)  # bf16 products summed in fp32 (CUDA only)
    else:
        s = torch.bmm(q.float(), kt.float())
    s = s.view(B, H, T, L) * Dh ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    p = s.softmax(-1).to(v.dtype)  # the probabilities in the input dtype, as flash attention multiplies them
    return torch.bmm(p.view(B * H, T, L), v.view(B * H, L, Dh)).view(B, H, T, Dh)


@contextmanager
def linears_cast(module, dtype):
    """Within the block, every nn.Linear of `module` holds copies of its weight and bias in `dtype`.
    Under autocast a Linear casts its fp32 weight at each call; a CUDA graph recorded so would cast all the
    decoder's matrices again at every step. Yields the copies: a graph recorded inside reads them, so they
    must live as long as the graph does."""
    saved, copies = [], []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            for name, p in list(m._parameters.items()):
                if p is not None and p.dtype != dtype:
                    saved.append((m, name, p))
                    m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    copies.append(m._parameters[name])
    try:
        yield copies
    finally:
        for m, name, p in saved:
            m._parameters[name] = p


@torch.no_grad()
def cuda_graph(fn, module=None):
    """fn() whose kernels, after the first call, are replayed as one CUDA graph: a decoding step of mBART is
    hundreds of small kernels whose launches, not the GPU, set the pace. fn reads its inputs from, and returns,
    tensors that stay in place (replays overwrite the returned tensor). The first call runs fn() on a side stream
    and records it there while the GPU runs it (torch.cuda.graph would first wait for the GPU and empty PyTorch's
    memory cache); under autocast the Linear layers of `module` are recorded with their weights cast once."""
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda")
    graph, out, keep = None, None, None

    # call must not refer to itself: in a reference cycle the graph would be freed by the cycle collector,
    # which can run in the middle of a later recording, and freeing a graph there breaks that recording.
    def call():
        nonlocal graph, out, keep
        if graph is not None:
            graph.replay()
            return out
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        cast = linears_cast(module, dtype) if autocast and module is not None else nullcontext([])
        with torch.cuda.stream(side):
            first = fn()
            graph = torch.cuda.CUDAGraph()
            # autocast's cache of cast weights must stay off while recording (its tensors would live in the
            # graph)
            with cast as copies, torch.autocast("cuda", dtype, enabled=autocast, cache_enabled=False):
                graph.capture_begin()
                try:
                    out = fn()
                finally:
                    graph.capture_end()
        keep = copies  # the graph reads them
        main.wait_stream(side)
        first.record_stream(main)  # made on the side stream, used on the main one
        return first
    return call
