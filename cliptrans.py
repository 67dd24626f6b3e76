"""
CLIPTrans in one file of pure PyTorch.

Gupta, Mittal, Shreyas, Bhatt, Goyal, "CLIPTrans: Transferring Visual Knowledge with Pre-trained Models
for Multimodal Machine Translation", ICCV 2023 (arXiv 2308.15226).

    image  --CLIP ViT-B/32------\
                                 >-- 512-d vector --mapping network--> 10 prefix vectors --> mBART-50 decoder
    source --M-CLIP (XLM-R)-----/                                                              ^
    source --------------------------------------------------------------> mBART-50 encoder --/

"We use M-CLIP ... whose text and image encoders share one embedding space": stage 1 (captioning)
trains the mapping network and the mBART decoder from the image embedding; stage 2 (translation) swaps
the image tower for the text tower, so no image is needed at test time.

Everything here is written from scratch and matches the Hugging Face models number for number:
- image tower:  transformers/models/clip/modeling_clip.py   (CLIPModel.get_image_features)
- text tower:   transformers/models/xlm_roberta/modeling_xlm_roberta.py + multilingual_clip's mean pooling
- translation:  transformers/models/mbart/modeling_mbart.py (MBartForConditionalGeneration)
- search:       transformers/generation/utils.py            (greedy and beam search)

Weights come from `weights.py` (`python weights.py --help`); training from `train.py`.
"""

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

# -----------------------------------------------------------------------------
# Configuration. The `paper` preset has the exact sizes of the public checkpoints; weights.py reads the
# sizes from the Hugging Face configs and checks them against these classes, never assumes them.


@dataclass
class VisionConfig:
    """OpenAI CLIP ViT (image tower). Defaults: ViT-B/32."""
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    embed_dim: int = 512  # the shared CLIP space
    eps: float = 1e-5


@dataclass
class TextConfig:
    """M-CLIP text tower: XLM-R (post-LN BERT) + mean pooling + a linear map into the CLIP space."""
    vocab_size: int = 250002
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp: int = 4096
    max_positions: int = 514  # includes the 2 rows skipped by padding-aware position ids
    type_vocab_size: int = 1
    pad_id: int = 1
    embed_dim: int = 512
    dropout: float = 0.1
    eps: float = 1e-5  # the XLM-R config says 1e-12 by default; the checkpoint uses 1e-5


@dataclass
class MBartConfig:
    """mBART-50 encoder-decoder. Defaults: facebook/mbart-large-50."""
    vocab_size: int = 250054
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    heads: int = 16
    ffn: int = 4096
    max_positions: int = 1024  # the position table has 2 more rows (fairseq's offset)
    dropout: float = 0.1
    scale_embedding: bool = True  # token embeddings * sqrt(d_model)
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    decoder_start_id: int = 2  # mBART starts decoding from </s>
    eps: float = 1e-5


@dataclass
class MappingConfig:
    """The mapping network: one CLIP vector -> `prefix_len` vectors of the decoder's width."""
    kind: str = "mlp"  # "mlp" (the paper's default), "hidden_mlp" or "transformer"
    prefix_len: int = 10


@dataclass
class CLIPTransConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mbart: MBartConfig = field(default_factory=MBartConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)

    @classmethod
    def preset(cls, name):
        if name == "paper":  # mbart-large-50, XLM-R large + 512 projection, ViT-B/32
            return cls()
        if name == "tiny":  # trains on a CPU in minutes; the vocabulary size comes from the tokenizer
            return cls(
                vision=VisionConfig(image_size=32, patch_size=4, width=64, layers=2, heads=4, mlp=256, embed_dim=64),
                text=TextConfig(vocab_size=1024, width=64, layers=2, heads=4, mlp=256, max_positions=66, embed_dim=64),
                mbart=MBartConfig(vocab_size=1024, d_model=128, encoder_layers=2, decoder_layers=2, heads=4,
                                  ffn=512, max_positions=128),
                mapping=MappingConfig(kind="mlp", prefix_len=10),
            )
        raise ValueError(f"unknown preset {name!r}: expected 'paper' or 'tiny'")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
                   mbart=MBartConfig(**d["mbart"]), mapping=MappingConfig(**d["mapping"]))


# -----------------------------------------------------------------------------
# Building blocks shared by all four networks.

ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf GELU (mBART, XLM-R)
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": F.relu,  # the transformer mapping network (nn.TransformerEncoderLayer's default)
}


class KVCache:
    """The keys and values a decoder keeps between decoding steps.

    Self-attention: one buffer (layers, 2, B, H, beams, max_len, Dh) holds the keys and values of every layer:
    B sentences with `beams` slots each, allocated at the prompt and filled position by position, so a decoding
    step neither re-allocates nor copies the past. The prompt, the same for every beam, is written once, into
    slot 0, at an int position counted on the host. A decoding step writes beam j's new token into slot j, at a
    position given as a device tensor, and reads all the slots of its sentence: the shapes never change, so a
    CUDA graph can replay it.
    Beam search never moves keys or values. When beam j continues another beam's hypothesis, it takes that beam's
    `owner` row: owner[b, j, t] is the slot that holds position t of beam j's history (-1: not written yet).
    A reorder gathers B x beams x max_len integers instead of the keys and values written so far (up to 1 GB of
    bf16 for 128 sentences x 5 beams x 33 positions at the paper's sizes), and the beams of a sentence attend all
    its slots together, as one row, each masked to its own history (see `attend`).
    Cross-attention: each layer's keys and values of the source, (B, H, S, Dh) each, computed at the first call:
    one copy per sentence, not per beam.
    """

    def __init__(self, layers, max_len, beams=1):
        self.max_len, self.beams, self.len, self.kv, self.owner = max_len, beams, 0, None, None
        self.cross = [None] * layers

    def write(self, layer, k, v, pos):
        """k, v: the new keys and values of `layer`. At an int `pos`, (B, H, T, Dh) for T positions of each
        sentence, into slot 0; returns that slot's keys and values so far, (B, H, pos + T, Dh) each. At a tensor
        `pos`, (B * beams, H, 1, Dh), each beam's into its own slot; returns every slot, (B, H, beams * max_len, Dh)
        each: the keys of slot s at rows s * max_len ..."""
        if self.kv is None:
            B, H, _, Dh = k.shape
            # zeros, not empty: masked positions get weight 0, and 0 * (garbage NaN) would still be NaN
            self.kv = k.new_zeros(len(self.cross), 2, B, H, self.beams, self.max_len, Dh)
            self.owner = torch.full((B, self.beams, self.max_len), -1, dtype=torch.long, device=k.device)
        keys, values = self.kv[layer]  # (B, H, beams, max_len, Dh) each, views
        if isinstance(pos, int):
            end = pos + k.shape[2]
            keys[:, :, 0, pos:end], values[:, :, 0, pos:end] = k, v
            self.owner[:, :, pos:end] = 0  # every beam's history starts with the prompt in slot 0
            return keys[:, :, 0, :end], values[:, :, 0, :end]
        B, H, beams, _, Dh = keys.shape
        k, v = (t.view(B, beams, H, 1, Dh).transpose(1, 2) for t in (k, v))  # (B, H, beams, 1, Dh)
        keys.index_copy_(3, pos.view(1), k)
        values.index_copy_(3, pos.view(1), v)
        return keys.flatten(2, 3), values.flatten(2, 3)

    def attend(self, pos):
        """Before a decoding step at `pos` (a device tensor): beam j's token at `pos` lies in slot j. Returns the
        step's self-attention mask, bool (B, 1, beams, beams * max_len): beam j may attend slot s's position t
        when that is where position t of its history lies, which also masks the positions not written yet."""
        B, beams, _ = self.owner.shape
        slots = torch.arange(beams, device=self.owner.device)
        self.owner.index_copy_(2, pos.view(1), slots.view(1, beams, 1).expand(B, beams, 1))
        return (self.owner[:, :, None, :] == slots[:, None]).flatten(2)[:, None]

    def reorder(self, parent):
        """Beam search: beam j of sentence b continues the hypothesis of that sentence's beam parent[b, j], (B, beams):
        it takes that beam's history. In place: a recorded CUDA graph reads `owner` where it is."""
        self.owner.copy_(self.owner.gather(1, parent[:, :, None].expand_as(self.owner)))


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


class Attention(nn.Module):
    """Multi-head attention for all uses: self-attention (q, k, v from x), cross-attention (q from x,
    k and v from `memory`), with or without a KV cache. The q, k, v projections are fused into one
    (3C, C) matrix: self-attention does one matmul instead of three, cross-attention slices it."""

    def __init__(self, dim, heads, bias=True, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, memory=None, mask=None, causal=False, cache=None, layer=0, pos=0):
        # x: (B, T, C); memory: (B_src, S, C) for cross-attention; mask: bool, True = may attend, broadcast to
        # (B, H, T, S). With a cache (KVCache), this is decoder layer `layer` and x holds positions pos.. of the
        # sequence (pos: an int, or a 0-d device tensor for a single new token: fixed-shape decoding).
        B, T, C = x.shape
        heads = self.split_heads
        if memory is None:
            q, k, v = self.qkv(x).view(B, T, 3, C).unbind(2)  # (B, T, C) each
            k, v = heads(k), heads(v)  # (B, H, T, Dh)
            if cache is not None:
                k, v = cache.write(layer, k, v, pos)  # (B, H, past + T, Dh), or a decoding step's (B / beams, ...)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:C], None if b is None else b[:C])
            if cache is not None and cache.cross[layer] is not None:
                k, v = cache.cross[layer]
            else:
                k, v = map(heads, F.linear(memory, w[C:], None if b is None else b[C:]).view(*memory.shape[:2], 2, C)
                           .unbind(2))
                if cache is not None:
                    k, v = cache.cross[layer] = k.contiguous(), v.contiguous()
        # Beam search runs B = G x B_src rows, the G beams of a sentence next to each other. They share the keys and
        # values of the sentence's source, and in a decoding step those of all its beams (KVCache): their G x T
        # queries attend them together, as one row.
        G = B // k.shape[0]
        q = heads(q.reshape(B // G, G * T, C))  # (B / G, H, G * T, Dh)
        if cache is not None and T == 1 and DECODE_ATTENTION == "matmul":
            y = matmul_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, C))

    def split_heads(self, t):  # (b, t, C) -> (b, H, t, Dh)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A transformer layer. Pre-LN (`x + f(ln(x))`: CLIP, mBART) or post-LN (`ln(x + f(x))`: XLM-R, the
    transformer mapping network); with a cross-attention sub-layer in the mBART decoder."""

    def __init__(self, dim, heads, mlp, act, pre_norm=True, cross=False, dropout=0.0, attn_dropout=0.0, eps=1e-5):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn, self.ln_attn = Attention(dim, heads, dropout=attn_dropout), nn.LayerNorm(dim, eps=eps)
        if cross:
            self.cross, self.ln_cross = Attention(dim, heads, dropout=attn_dropout), nn.LayerNorm(dim, eps=eps)
        self.mlp, self.ln_mlp = MLP(dim, mlp, act), nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def residual(self, x, ln, f):
        if self.pre_norm:
            return x + self.drop(f(ln(x)))
        return ln(x + self.drop(f(x)))

    def forward(self, x, mask=None, causal=False, memory=None, memory_mask=None, cache=None, layer=0, pos=0):
        x = self.residual(x, self.ln_attn, lambda h: self.attn(h, mask=mask, causal=causal, cache=cache, layer=layer,
                                                               pos=pos))
        if memory is not None:
            x = self.residual(x, self.ln_cross, lambda h: self.cross(h, memory, mask=memory_mask, cache=cache,
                                                                     layer=layer))
        return self.residual(x, self.ln_mlp, self.mlp)


def key_padding_mask(attention_mask):
    """(B, S) with 1 for tokens, 0 for padding -> bool (B, 1, 1, S) for SDPA (True = may attend)."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


# -----------------------------------------------------------------------------
# The frozen towers of (M-)CLIP.


class VisionTower(nn.Module):
    """CLIP ViT: patches + CLS + positions -> pre-LN transformer -> LayerNorm of the CLS token -> projection.
    Output = `CLIPModel.get_image_features` (512-d for ViT-B/32, not normalised)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.cls = nn.Parameter(torch.zeros(c.width))
        self.pos = nn.Parameter(torch.zeros(n_patches + 1, c.width))
        self.ln_pre = nn.LayerNorm(c.width, eps=c.eps)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp, "quick_gelu", eps=c.eps) for _ in range(c.layers))
        self.ln_post = nn.LayerNorm(c.width, eps=c.eps)
        self.proj = nn.Linear(c.width, c.embed_dim, bias=False)

    def forward(self, pixel_values):  # (B, 3, H, W), CLIP-normalised
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos  # (B, 1 + N, C)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))  # (B, embed_dim): only the CLS token is pooled


class TextTower(nn.Module):
    """M-CLIP's text encoder: XLM-R -> mean over real tokens -> Linear into the CLIP space."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.pad_id = c.pad_id
        self.max_tokens = c.max_positions - c.pad_id - 1  # positions pad_id + 1 ..: 512 for XLM-R's 514 rows
        self.tok_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Embedding(c.max_positions, c.width)
        self.type_embed = nn.Embedding(c.type_vocab_size, c.width)  # one type: a learned constant
        self.ln_embed = nn.LayerNorm(c.width, eps=c.eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.width, c.heads, c.mlp, "gelu", pre_norm=False, dropout=c.dropout, attn_dropout=c.dropout, eps=c.eps)
            for _ in range(c.layers))
        self.proj = nn.Linear(c.width, c.embed_dim)

    def forward(self, input_ids, attention_mask):  # (B, T) each, `<s> x </s>` right-padded
        if input_ids.shape[1] > self.max_tokens:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the text tower's {self.max_tokens}: truncate them "
                             f"(TextTowerTokenizer.encode(texts, max_len={self.max_tokens}))")
        # Padding-aware positions as in fairseq: real tokens count up from pad_id + 1, padding sits at pad_id.
        real = (input_ids != self.pad_id).long()
        positions = torch.cumsum(real, dim=1) * real + self.pad_id
        x = self.tok_embed(input_ids) + self.pos_embed(positions) + self.type_embed.weight[0]
        x = self.drop(self.ln_embed(x))
        mask = key_padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, mask=mask)
        m = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        pooled = (x * m).sum(1) / m.sum(1)  # (B, C): mean over real tokens, as multilingual_clip does
        return self.proj(pooled)


# -----------------------------------------------------------------------------
# mBART-50.


class Embeddings(nn.Module):
    """Token embeddings (scaled by sqrt(d)) or given vectors, + learned positions, + LayerNorm, + dropout."""

    def __init__(self, c: MBartConfig):
        super().__init__()
        self.pos_embed = nn.Embedding(c.max_positions + 2, c.d_model)  # fairseq offset: position p is row p + 2
        self.ln_embed = nn.LayerNorm(c.d_model, eps=c.eps)
        self.drop = nn.Dropout(c.dropout)
        self.max_positions = c.max_positions

    def forward(self, x, start=0):  # x: (B, T, d) already scaled; start: positions already in the cache
        T = x.shape[1]
        if start + T > self.max_positions:
            raise ValueError(f"sequence of {start + T} positions exceeds mBART's {self.max_positions}: "
                             f"shorten the input or lower max_new_tokens")
        return self.drop(self.ln_embed(x + self.pos_embed.weight[start + 2:start + 2 + T]))


class Encoder(nn.Module):
    def __init__(self, c: MBartConfig):
        super().__init__()
        self.embed = Embeddings(c)
        self.layers = nn.ModuleList(Block(c.d_model, c.heads, c.ffn, "gelu", dropout=c.dropout, eps=c.eps)
                                    for _ in range(c.encoder_layers))
        self.ln_final = nn.LayerNorm(c.d_model, eps=c.eps)

    def forward(self, x, attention_mask=None):  # x: (B, S, d) scaled token embeddings
        x = self.embed(x)
        mask = key_padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.ln_final(x)


class Decoder(nn.Module):
    def __init__(self, c: MBartConfig):
        super().__init__()
        self.embed = Embeddings(c)
        self.layers = nn.ModuleList(Block(c.d_model, c.heads, c.ffn, "gelu", cross=True, dropout=c.dropout, eps=c.eps)
                                    for _ in range(c.decoder_layers))
        self.ln_final = nn.LayerNorm(c.d_model, eps=c.eps)

    def forward(self, x, memory, memory_mask=None, mask=None, cache=None):
        # x: (B, T, d) decoder input vectors; memory (B_src, S, d), B a multiple of B_src (beams);
        # mask: (T, T) bool, or None for plain causal attention.
        # With a cache, x holds only the new positions and they may see every cached one (mask=None, causal=False).
        start = 0 if cache is None else cache.len
        x = self.embed(x, start)
        memory_mask = key_padding_mask(memory_mask)
        causal = mask is None and start == 0 and x.shape[1] > 1
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, causal=causal, memory=memory, memory_mask=memory_mask, cache=cache, layer=i,
                      pos=start)
        if cache is not None:
            cache.len += x.shape[1]
        return self.ln_final(x)

    def step(self, x, pos, memory, memory_mask, cache):
        """One new token per row, x (B, 1, d), at position `pos` (a 0-d tensor on the device), with shapes that
        never change: each self-attention writes at `pos` and reads all the cache slots of the row's sentence,
        masked to the row's own history (KVCache.attend). So a decoding step can be recorded once as a CUDA graph
        and replayed. Returns (B, d)."""
        x = self.embed.drop(self.embed.ln_embed(x + self.embed.pos_embed(pos + 2)))
        mask = cache.attend(pos)  # (B / beams, 1, beams, beams * max_len): each beam its own history
        memory_mask = key_padding_mask(memory_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, memory=memory, memory_mask=memory_mask, cache=cache, layer=i, pos=pos)
        return self.ln_final(x)[:, -1]

    def new_cache(self, max_len, beams=1):
        return KVCache(len(self.layers), max_len, beams)


class MBart(nn.Module):
    """mBART-50: pre-LN encoder-decoder with a shared, tied vocabulary. `forward` = the logits of
    `MBartForConditionalGeneration`; `generate` = its greedy and beam search."""

    def __init__(self, c: MBartConfig):
        super().__init__()
        self.config = c
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.shared = nn.Embedding(c.vocab_size, c.d_model)  # encoder input, decoder input and output projection
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.register_buffer("final_logits_bias", torch.zeros(c.vocab_size))

    def embed_tokens(self, ids):  # (B, T) -> (B, T, d)
        return self.shared(ids) * self.embed_scale

    def encode(self, input_ids, attention_mask=None):  # (B, S) -> (B, S, d)
        return self.encoder(self.embed_tokens(input_ids), attention_mask)

    def logits(self, h):  # (..., d) -> (..., V): the output projection is the token embedding itself
        return F.linear(h, self.shared.weight, self.final_logits_bias)

    def forward(self, input_ids, attention_mask, decoder_input_ids):  # -> (B, T, V)
        memory = self.encode(input_ids, attention_mask)
        return self.logits(self.decoder(self.embed_tokens(decoder_input_ids), memory, attention_mask))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, num_beams=5, max_new_tokens=60, forced_bos_token_id=None,
                 **search_args):
        """mBART alone, with Hugging Face's semantics: returns (B, 1 + n) = [decoder start, tokens...], padded."""
        memory = self.encode(input_ids, attention_mask)
        start = torch.full((input_ids.shape[0], 1), self.config.decoder_start_id, device=input_ids.device)
        tokens = search(self, memory, attention_mask, self.embed_tokens(start), None, num_beams=num_beams,
                        max_new_tokens=max_new_tokens, forced_bos_token_id=forced_bos_token_id, **search_args)
        return torch.cat([start, tokens], dim=1)


# -----------------------------------------------------------------------------
# Decoding: greedy and beam search, Hugging Face's algorithm, with a static KV cache and no host sync per step.


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
    (transformers' scores, log_softmax first) and those log-probabilities, with token `banned` (or None) at -inf.
    A row's log-softmax keeps its order, so the tokens are found in the logits (under bf16 autocast, half the
    bytes of the fp32 log-probabilities), one more than k in case `banned` is among them.
    Returns (log-probabilities (R, k), tokens (R, k))."""
    logp = F.log_softmax(logits, -1, dtype=torch.float32)  # (R, V)
    tok = topk_by_chunks(logits, k + (banned is not None), chunk)[1]
    top = logp.gather(1, tok)
    if banned is not None:
        top, i = torch.topk(top.masked_fill(tok == banned, -math.inf), k)
        tok = tok.gather(1, i)
    return top, tok


# How a decoding step attends (a sentence's beams, one query token each, against its cache slots): None, PyTorch's
# scaled_dot_product_attention choosing its kernel; a list of SDPBackend, those kernels only; or "matmul",
# matmul_attention. bench.py times them. On an H100, when each beam still attended a row of keys of its own, the
# memory-efficient kernel and the matmul attention were faster than PyTorch's choice in one run and about as fast
# in another (README, Performance).
DECODE_ATTENTION = None
TOPK_CHUNK = 64  # beam search's top-k per beam, from chunks of this many logits (see topk_by_chunks)


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
    hundreds of small kernels whose launches, not the GPU, set the pace. fn must read its inputs from, and return,
    tensors that stay in place (replays overwrite the returned tensor).

    The first call runs fn() with plain launches on a side stream (which sets up what its kernels need: cuBLAS
    workspaces, cuDNN plans) and records the same kernels there while the GPU runs them. torch.cuda.graph would
    first wait for the GPU and empty PyTorch's memory cache: the GPU would idle during the recording. Under
    autocast, the Linear layers of `module` are recorded with their weights cast once (see linears_cast)."""
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda")
    graph, out, keep = None, None, None

    # call must not refer to itself: in a reference cycle the graph would be freed by Python's cycle collector,
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
            # autocast's cache of cast weights must stay off while recording (its tensors would live in the graph)
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


def search(mbart, memory, memory_mask, prompt, prompt_mask, num_beams=5, max_new_tokens=60, min_new_tokens=0,
           forced_bos_token_id=None, forced_eos=True, length_penalty=1.0, early_stopping=True, check_every=4,
           use_cuda_graph=True, compile_scores=None):
    """Continue the decoder prompt `prompt` (B, P, d) (already embedded: `</s>` for mBART, `</s> P1..P10` for
    CLIPTrans; `prompt_mask` its (P, P) self-attention mask or None) by up to `max_new_tokens` tokens.

    Follows transformers' generation loop step for step: the forced first token (target language) and the
    forced `</s>` at the last step replace the whole distribution (log-probability 0); finished beams score
    `sum log p / n ** length_penalty` with n the number of generated tokens; `early_stopping` True, False
    (its heuristic) or "never". The stopping test needs the GPU's answer, so it runs every `check_every`
    steps only: steps taken after every sentence has finished change nothing (finished sentences are masked).
    On CUDA each decoding step is replayed as a CUDA graph (use_cuda_graph=False: plain launches).
    compile_scores: beam search's log-softmax and top-k under torch.compile, which reads each row of logits
    once instead of writing and reading fp32 log-probabilities (compiled at the first call); None: on CUDA only,
    where it made beam-5 search 1.3x faster on an H100 (on a CPU the compilation outweighs the gain).
    Returns the new tokens (B, n), padded with pad_id after `</s>`."""
    c = mbart.config
    B, P, _ = prompt.shape
    nb, dev = num_beams, prompt.device
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"num_beams={num_beams}, max_new_tokens={max_new_tokens}: expected at least 1 of each")
    if P + max_new_tokens > c.max_positions:
        raise ValueError(f"{P} prompt positions + max_new_tokens={max_new_tokens} exceed mBART's {c.max_positions}: "
                         f"max_new_tokens can be at most {c.max_positions - P}")
    # Each sentence gets nb rows: (B * nb, ...) with the beams of a sentence next to each other. Neither the source
    # nor the prompt is repeated: the prompt runs once per sentence, and the nb rows of a sentence attend one copy
    # of its source and of its prompt (see Attention and KVCache).
    cache = mbart.decoder.new_cache(P + max_new_tokens, beams=nb)
    h = mbart.decoder(prompt, memory, memory_mask, mask=prompt_mask, cache=cache)  # (B, P, d)

    # The output projection, cast once for the whole search and padded to a multiple of 64 rows: 250054 is
    # not a multiple of 8, and misaligned logits rows keep the GPU's matrix units off their fast kernels.
    # The padding logits are -inf: they are never chosen and add nothing to a softmax.
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else mbart.shared.weight.dtype
    V = c.vocab_size
    weight = F.pad(mbart.shared.weight.to(dtype), (0, 0, 0, -V % 64))  # (also a multiple of TOPK_CHUNK)
    bias = F.pad(mbart.final_logits_bias.to(dtype), (0, -V % 64), value=-math.inf)

    def project(h):  # (B * nb, d) -> logits (B * nb, V + pad), in the autocast dtype like Hugging Face's
        return F.linear(h.to(dtype), weight, bias)

    # The decoding step reads its token and position from tensors that stay in place.
    token_in = torch.zeros(B * nb, dtype=torch.long, device=dev)
    pos = torch.full((), P, dtype=torch.long, device=dev)

    def decode():
        with sdpa_kernel(DECODE_ATTENTION) if isinstance(DECODE_ATTENTION, list) else nullcontext():
            h = mbart.decoder.step(mbart.embed_tokens(token_in[:, None]), pos, memory, memory_mask, cache)
        return project(h)

    if use_cuda_graph and dev.type == "cuda" and max_new_tokens > 2:  # decode() runs max_new_tokens - 1 times:
        decode = cuda_graph(decode, mbart.decoder)                       # the first records, the others replay

    def next_logits(step, tokens):  # the tokens chosen at `step` -> logits for step + 1
        token_in.copy_(tokens)
        pos.fill_(P + step)
        return decode()

    def forced(step):  # the token that transformers' processors force at `step` (the last one applied wins), or None
        if step == max_new_tokens - 1 and forced_eos:
            return c.eos_id
        return forced_bos_token_id if step == 0 else None

    def greedy_token(step, logits):  # transformers' processors on the logits, in its order, then the best token
        if forced(step) is not None:  # a forced token replaces the whole distribution
            return torch.full((B,), forced(step), device=dev)
        if step < min_new_tokens:
            logits[:, c.eos_id] = -math.inf  # (in place: the logits are not used again)
        return logits.argmax(-1)

    # Only the prompt's last position predicts the next token, the same for all the beams of a sentence.
    logits = project(h[:, -1].repeat_interleave(nb, dim=0))  # (B * nb, V + pad)
    if nb == 1:  # greedy
        out = torch.full((B, max_new_tokens), c.pad_id, dtype=torch.long, device=dev)
        running = torch.ones(B, dtype=torch.bool, device=dev)
        for step in range(max_new_tokens):
            tok = greedy_token(step, logits)
            tok = torch.where(running, tok, c.pad_id)  # finished sentences emit padding
            out[:, step] = tok
            running = running & (tok != c.eos_id)
            if step + 1 < max_new_tokens:
                if (step + 1) % check_every == 0 and not running.any():
                    break
                logits = next_logits(step, tok)
        # Hugging Face stops when every sentence has ended: the output is as long as the longest sentence.
        ended = out == c.eos_id
        lengths = torch.where(ended.any(1), ended.int().argmax(1) + 1, max_new_tokens)
        return out[:, :int(lengths.max())]

    # Beam search. Running beams (B, nb) and finished hypotheses (B, nb), all in static tensors.
    if compile_scores is None:
        compile_scores = dev.type == "cuda"
    candidates = torch.compile(beam_candidates) if compile_scores else beam_candidates
    k = 2 * nb  # keep 2 nb candidates so nb survive even if nb of them just ended
    seqs = torch.full((B, nb, max_new_tokens), c.pad_id, dtype=torch.long, device=dev)
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = -1e9  # at the first step all beams are equal: expand only the first
    fin_seqs = seqs.clone()
    fin_scores = torch.full((B, nb), -1e9, device=dev)
    fin_lens = torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=dev)  # could a running beam still beat a finished one?
    top_nb = torch.arange(k, device=dev) < nb
    for step in range(max_new_tokens):
        # The 2 nb best of all nb x V continuations are among the 2 nb best of each beam: a top-k per beam,
        # then over the nb x 2 nb survivors (the same set as transformers' top-k over nb x V, far cheaper).
        if forced(step) is None:  # (B * nb, 2 nb) each
            top_logp, top_tok = candidates(logits, k, c.eos_id if step < min_new_tokens else None, TOPK_CHUNK)
        else:  # a forced token replaces the whole distribution: log-probability 0, every other token -inf (those
            # candidates never survive, whatever their token)
            top_logp = torch.full((B * nb, k), -math.inf, device=dev)
            top_logp[:, 0] = 0.0
            top_tok = torch.full((B * nb, k), forced(step), device=dev)
        scores = top_logp.view(B, nb, k) + run_scores[:, :, None]  # log-probabilities of whole sequences
        cand_scores, cand = torch.topk(scores.view(B, nb * k), k)  # (B, 2 nb)
        cand_beam, cand_tok = cand // k, torch.take_along_dim(top_tok.view(B, nb * k), cand, dim=1)
        cand_seqs = torch.take_along_dim(seqs, cand_beam[:, :, None], dim=1)
        cand_seqs[:, :, step] = cand_tok
        ended = (cand_tok == c.eos_id) | (step == max_new_tokens - 1)  # (B, 2 nb)

        # The nb best candidates that did not end continue.
        alive = cand_scores + ended.float() * -1e9
        keep = torch.topk(alive, nb)[1]
        seqs = torch.take_along_dim(cand_seqs, keep[:, :, None], dim=1)
        run_scores = torch.take_along_dim(alive, keep, dim=1)
        parent = torch.take_along_dim(cand_beam, keep, dim=1)

        # Candidates among the top nb that ended compete with the finished hypotheses.
        just_ended = ended & top_nb[None, :]
        new = cand_scores / ((step + 1) ** length_penalty)
        new = new + (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        new = new + (~open_).float() * -1e9
        new = new + (~just_ended) * -1e9
        merged = torch.cat([fin_scores, new], dim=1)
        best = torch.topk(merged, nb)[1]
        fin_scores = torch.take_along_dim(merged, best, dim=1)
        fin_seqs = torch.take_along_dim(torch.cat([fin_seqs, cand_seqs], 1), best[:, :, None], dim=1)
        fin_lens = torch.take_along_dim(torch.cat([fin_lens, torch.full_like(cand_tok, step + 1)], 1), best, dim=1)
        fin_done = torch.take_along_dim(torch.cat([fin_done, just_ended], 1), best, dim=1)

        # transformers' stopping heuristic (early_stopping=False) or its exact bound ("never").
        n = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else step + 1
        best_possible = run_scores[:, :1] / (n ** length_penalty)
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True)[0], -1e9)
        open_ = open_ & (best_possible > worst).any(-1, keepdim=True)

        if step + 1 < max_new_tokens:
            if (step + 1) % check_every == 0:
                done = ~open_.any() | (fin_done.all() & (early_stopping is True))
                if done:
                    break
            cache.reorder(parent)  # parents are beams of the same sentence
            logits = next_logits(step, seqs[:, :, step].reshape(-1))
    out = fin_seqs[:, 0]  # the best finished hypothesis of each sentence
    out = torch.where(torch.arange(max_new_tokens, device=dev) < fin_lens[:, :1], out, c.pad_id)
    return out[:, :int(fin_lens[:, 0].max())]


# -----------------------------------------------------------------------------
# The mapping network and CLIPTrans.


class MappingNetwork(nn.Module):
    """One CLIP vector (B, D) -> the prefix (B, prefix_len, d_model). "A lightweight mapping network
    ... projects the CLIP embedding into a sequence of prefix embeddings." Variants of the official code:
    mlp: Linear(D, P d) + PReLU; hidden_mlp: Linear(D, d), ReLU, Linear(d, P d), PReLU;
    transformer: Linear(D, P d) then one post-LN transformer layer (2 heads, ffn d // 3, ReLU)."""

    def __init__(self, c: MappingConfig, clip_dim, d_model):
        super().__init__()
        self.kind, self.prefix_len, self.d_model = c.kind, c.prefix_len, d_model
        P = c.prefix_len
        if c.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(clip_dim, P * d_model), nn.PReLU())
        elif c.kind == "hidden_mlp":
            self.net = nn.Sequential(nn.Linear(clip_dim, d_model), nn.ReLU(), nn.Linear(d_model, P * d_model), nn.PReLU())
        elif c.kind == "transformer":
            self.net = nn.Linear(clip_dim, P * d_model)
            self.block = Block(d_model, 2, d_model // 3, "relu", pre_norm=False, dropout=0.1, attn_dropout=0.1)
        else:
            raise ValueError(f"unknown mapping network {c.kind!r}: expected 'mlp', 'hidden_mlp' or 'transformer'")

    def forward(self, clip_embeds):  # (B, D) -> (B, P, d)
        dtype = next(self.parameters()).dtype
        prefix = self.net(clip_embeds.to(dtype)).view(-1, self.prefix_len, self.d_model)
        return self.block(prefix) if self.kind == "transformer" else prefix


def init_weights(module):
    """Fresh weights for what no checkpoint provides (the mapping network, the tiny preset): N(0, 0.02) as in
    mBART and BERT, LayerNorms at identity, PReLU at its default slope 0.25."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, VisionTower):
        nn.init.normal_(module.cls, std=0.02)
        nn.init.normal_(module.pos, std=0.02)


def prefix_mask(prefix_len, length, device=None):
    """Decoder self-attention mask for `</s> P1..Pp <lang> y1..yn` (True = may attend), (length, length).
    Causal, except that the prefix is bidirectional: every prefix vector sees all the others.
    Position 0 (`</s>`) sees only itself; every later position sees the whole prefix."""
    i = torch.arange(length, device=device)
    in_prefix = (i >= 1) & (i <= prefix_len)
    return (i[None, :] <= i[:, None]) | (in_prefix[:, None] & in_prefix[None, :])


class CLIPTrans(nn.Module):
    """The two towers, the mapping network and mBART-50.

    Decoder layout, the same for training and generation:

        input:  </s>      P1 .. P10   <lang>  y1 .. yn
        label:  <lang>    -100 x 10   y1      y2 .. </s>

    The official code generates from `P1..P10 </s>` although it trains on the layout above; here one
    layout serves both, so generation continues exactly the sequences training saw.
    The prefix vectors are not scaled by sqrt(d) (token embeddings are); positions are added to all."""

    def __init__(self, config: CLIPTransConfig):
        super().__init__()
        if config.vision.embed_dim != config.text.embed_dim:
            raise ValueError(f"the towers must share one space: image {config.vision.embed_dim}-d, "
                             f"text {config.text.embed_dim}-d")
        self.config = config
        self.vision = VisionTower(config.vision)
        self.text = TextTower(config.text)
        self.mapping = MappingNetwork(config.mapping, config.vision.embed_dim, config.mbart.d_model)
        self.mbart = MBart(config.mbart)
        self.apply(init_weights)

    def encode_image(self, pixel_values):  # (B, 3, H, W) -> (B, D)
        return self.vision(pixel_values)

    def encode_text(self, input_ids, attention_mask):  # (B, T) `<s> x </s>` -> (B, D)
        return self.text(input_ids, attention_mask)

    def decoder_inputs(self, clip_embeds, targets):
        """clip_embeds (B, D); targets (B, L) = `<lang> y1..yn </s>` right-padded.
        Returns the decoder input vectors (B, 1 + P + L - 1, d) and the labels (B, 1 + P + L - 1)."""
        c = self.config.mbart
        B, P = targets.shape[0], self.config.mapping.prefix_len
        eos = torch.full((B, 1), c.eos_id, dtype=targets.dtype, device=targets.device)
        tokens = self.mbart.embed_tokens(torch.cat([eos, targets[:, :-1]], dim=1))  # (B, L, d): </s> <lang> y1..
        prefix = self.mapping(clip_embeds).to(tokens.dtype)  # (B, P, d)
        embeds = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)
        labels = targets.masked_fill(targets == c.pad_id, -100)
        labels = torch.cat([labels[:, :1], labels.new_full((B, P), -100), labels[:, 1:]], dim=1)
        return embeds, labels

    def forward(self, clip_embeds, input_ids, attention_mask, targets):
        """One training step of either stage: the mean cross-entropy over the target tokens.
        clip_embeds (B, D): image (stage 1) or source-sentence (stage 2) embeddings;
        input_ids / attention_mask (B, S): the encoder input (`<lang> </s>` in stage 1, the source in stage 2)."""
        P = self.config.mapping.prefix_len
        embeds, labels = self.decoder_inputs(clip_embeds, targets)
        memory = self.mbart.encode(input_ids, attention_mask)
        h = self.mbart.decoder(embeds, memory, attention_mask, mask=prefix_mask(P, embeds.shape[1], embeds.device))
        # The vocabulary projection only where a loss can be: position 0 and the targets, not the prefix.
        h, labels = torch.cat([h[:, :1], h[:, P + 1:]], 1), torch.cat([labels[:, :1], labels[:, P + 1:]], 1)
        logits = self.mbart.logits(h)  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())  # ignores -100; fp32 under autocast

    @torch.no_grad()
    def generate(self, clip_embeds, input_ids, attention_mask, tgt_lang_id, num_beams=5, max_new_tokens=60,
                 **search_args):
        """Translate (stage 2) or caption (stage 1): returns the new tokens (B, n), `<lang> y1 .. </s>`, padded."""
        c = self.config.mbart
        B, P = clip_embeds.shape[0], self.config.mapping.prefix_len
        memory = self.mbart.encode(input_ids, attention_mask)
        eos = self.mbart.embed_tokens(torch.full((B, 1), c.eos_id, device=input_ids.device))
        prompt = torch.cat([eos, self.mapping(clip_embeds).to(eos.dtype)], dim=1)  # (B, 1 + P, d): `</s> P1..P10`
        mask = prefix_mask(P, 1 + P, prompt.device)
        return search(self.mbart, memory, attention_mask, prompt, mask, num_beams=num_beams,
                      max_new_tokens=max_new_tokens, forced_bos_token_id=tgt_lang_id, **search_args)
