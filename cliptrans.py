"""
CLIPTrans in one file of pure PyTorch: the networks and the paper's idea, nothing else.

Devaansh Gupta, Siddhant Kharbanda, Jiawei Zhou, Wanhua Li, Hanspeter Pfister, Donglai Wei: "CLIPTrans:
Transferring Visual Knowledge with Pre-trained Models for Multimodal Machine Translation", ICCV 2023
(arXiv 2308.15226).

    image  --CLIP ViT-B/32------\
                                 >-- 512-d vector --mapping network--> 10 prefix vectors --> mBART-50 decoder
    source --M-CLIP (XLM-R)-----/                                                              ^
    source --------------------------------------------------------------> mBART-50 encoder --/

Stage 1 (captioning) trains the mapping network and the mBART decoder to caption an image from its CLIP
embedding; stage 2 (translation) swaps the image tower for M-CLIP's text tower, which embeds sentences into
the same space, so no image is needed at test time.

Reading order: the paper's own part first, the last section: `MappingNetwork`, `prefix_mask` and `CLIPTrans`,
whose `forward` goes from one CLIP vector and a sentence to the loss. Then up the file, what it calls: mBART-50;
the two frozen towers; the blocks all four networks share (attention, MLP, a transformer layer); the configs.

Every network matches its Hugging Face counterpart number for number (tests/test_model.py):
- image tower:  transformers/models/clip/modeling_clip.py   (CLIPModel.get_image_features)
- text tower:   transformers/models/xlm_roberta/modeling_xlm_roberta.py + multilingual_clip's mean pooling
- translation:  transformers/models/mbart/modeling_mbart.py (MBartForConditionalGeneration)
Greedy and beam search (decoding.py) run this file's decoder, handed a cache (`Attention`'s `cache`).
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import decoding

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


MAPPINGS = ("mlp", "hidden_mlp", "transformer")  # the official code's mapping networks (MappingNetwork)


@dataclass
class MappingConfig:
    """The mapping network: one CLIP vector -> `prefix_len` vectors of the decoder's width."""
    kind: str = "mlp"  # one of MAPPINGS: "mlp" (the paper's default), "hidden_mlp" or "transformer"
    prefix_len: int = 10


@dataclass
class CLIPTransConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mbart: MBartConfig = field(default_factory=MBartConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    prompt: str = "train"  # the decoder's prompt in `generate` (PROMPTS): "train", or the official code's "official"

    @classmethod
    def preset(cls, name):
        if name == "paper":  # mbart-large-50, XLM-R large + 512 projection, ViT-B/32
            return cls()
        if name == "tiny":  # trains on a CPU in minutes; the vocabulary size comes from the tokenizer
            return cls(
                vision=VisionConfig(image_size=32, patch_size=4, width=64, layers=2, heads=4, mlp=256,
                                    embed_dim=64),
                text=TextConfig(vocab_size=1024, width=64, layers=2, heads=4, mlp=256, max_positions=66,
                                embed_dim=64),
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
                   mbart=MBartConfig(**d["mbart"]), mapping=MappingConfig(**d["mapping"]), prompt=d["prompt"])


# -----------------------------------------------------------------------------
# Building blocks shared by all four networks.

ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf GELU (mBART, XLM-R)
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": F.relu,  # the transformer mapping network (nn.TransformerEncoderLayer's default)
}


class Attention(nn.Module):
    """Multi-head attention: self-attention (q, k, v from x) or cross-attention (q from x, k and v from
    `memory`, the encoder's output). The q, k, v projections are fused into one (3C, C) matrix:
    self-attention does one matmul instead of three; cross-attention slices it."""

    def __init__(self, dim, heads, bias=True, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, memory=None, mask=None, causal=False, cache=None):
        # x: (B, T, C); memory: (B, S, C); mask: bool, True = may attend, broadcast to (B, H, T, S);
        # cache: generation's (decoding.Cache), which keeps keys and values from one decoding step to the next
        B, T, C = x.shape
        if memory is None:
            q, k, v = self.qkv(x).view(B, T, 3, C).unbind(2)  # (B, T, C) each
            k, v = self.split_heads(k), self.split_heads(v)  # (B, H, T, Dh)
            if cache is not None:  # the new positions' keys and values join those of the earlier ones
                k, v = cache.update(self, k, v)
        elif cache is None:
            q, (k, v) = self.project_query(x), self.project_memory(memory)
        else:  # the source's keys and values, projected at the first decoding call only
            q, (k, v) = self.project_query(x), cache.memory(self, memory)
        if cache is not None:  # (B, T, C): the cache knows how the beams of a sentence share their keys
            return self.out(cache.attend(q, k, v, mask, causal))
        y = F.scaled_dot_product_attention(self.split_heads(q), k, v, attn_mask=mask,
                                           is_causal=causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(B, T, C))

    def project_query(self, x):  # cross-attention: q from the first C rows of the fused matrix, (B, T, C)
        C, w, b = x.shape[-1], self.qkv.weight, self.qkv.bias
        return F.linear(x, w[:C], None if b is None else b[:C])

    def project_memory(self, memory):  # cross-attention: k and v from the other 2C rows, (B, H, S, Dh) each
        C, w, b = memory.shape[-1], self.qkv.weight, self.qkv.bias
        kv = F.linear(memory, w[C:], None if b is None else b[C:]).view(*memory.shape[:2], 2, C)
        return tuple(map(self.split_heads, kv.unbind(2)))

    def split_heads(self, t):  # (B, T, C) -> (B, H, T, Dh)
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

    def __init__(self, dim, heads, mlp, act, pre_norm=True, cross=False, dropout=0.0, attn_dropout=0.0,
                 eps=1e-5):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn, self.ln_attn = Attention(dim, heads, dropout=attn_dropout), nn.LayerNorm(dim, eps=eps)
        if cross:
            self.cross = Attention(dim, heads, dropout=attn_dropout)
            self.ln_cross = nn.LayerNorm(dim, eps=eps)
        self.mlp, self.ln_mlp = MLP(dim, mlp, act), nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def residual(self, x, ln, f):
        if self.pre_norm:
            return x + self.drop(f(ln(x)))
        return ln(x + self.drop(f(x)))

    def forward(self, x, mask=None, causal=False, memory=None, memory_mask=None, cache=None):
        x = self.residual(x, self.ln_attn, lambda h: self.attn(h, mask=mask, causal=causal, cache=cache))
        if memory is not None:
            x = self.residual(x, self.ln_cross, lambda h: self.cross(h, memory, mask=memory_mask, cache=cache))
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
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp, "quick_gelu", eps=c.eps)
                                    for _ in range(c.layers))
        self.ln_post = nn.LayerNorm(c.width, eps=c.eps)
        self.proj = nn.Linear(c.width, c.embed_dim, bias=False)

    def forward(self, pixel_values):  # (B, 3, H, W), CLIP-normalised
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, C, H / p, W / p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
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
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp, "gelu", pre_norm=False, dropout=c.dropout,
                                          attn_dropout=c.dropout, eps=c.eps) for _ in range(c.layers))
        self.proj = nn.Linear(c.width, c.embed_dim)

    def forward(self, input_ids, attention_mask):  # (B, T) each, `<s> x </s>` right-padded
        if input_ids.shape[1] > self.max_tokens:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the text tower's {self.max_tokens}: "
                             f"truncate them (TextTowerTokenizer.encode(texts, max_len={self.max_tokens}))")
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
    """Input vectors (scaled token embeddings, or the prefix) + learned positions, LayerNorm, dropout."""

    def __init__(self, c: MBartConfig):
        super().__init__()
        self.pos_embed = nn.Embedding(c.max_positions + 2, c.d_model)  # fairseq's offset: position p: row p+2
        self.ln_embed = nn.LayerNorm(c.d_model, eps=c.eps)
        self.drop = nn.Dropout(c.dropout)
        self.max_positions = c.max_positions

    def forward(self, x, start=0):  # (B, T, d) at positions start.. -> (B, T, d)
        T = x.shape[1]
        if torch.is_tensor(start):  # a decoding step's position, read on the device (a CUDA graph replays it)
            positions = self.pos_embed(start + 2 + torch.arange(T, device=x.device))
        elif start + T > self.max_positions:
            raise ValueError(f"sequence of {start + T} positions exceeds mBART's {self.max_positions}: "
                             f"shorten the input or lower max_new_tokens")
        else:
            positions = self.pos_embed.weight[2 + start:2 + start + T]
        return self.drop(self.ln_embed(x + positions))


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
        self.layers = nn.ModuleList(Block(c.d_model, c.heads, c.ffn, "gelu", cross=True, dropout=c.dropout,
                                          eps=c.eps) for _ in range(c.decoder_layers))
        self.ln_final = nn.LayerNorm(c.d_model, eps=c.eps)

    def forward(self, x, memory, memory_mask=None, mask=None, start=0, cache=None):
        # x: (B, T, d) decoder input vectors at positions start..; memory: (B, S, d) the encoder's output;
        # mask: (T, T) bool self-attention mask (CLIPTrans: `prefix_mask`), or None for causal attention;
        # cache: generation's (decoding.Cache), which also gives a decoding step its mask (Cache.begin_step).
        x = self.embed(x, start)
        memory_mask = key_padding_mask(memory_mask)
        causal = mask is None and x.shape[1] > 1
        for layer in self.layers:
            x = layer(x, mask=mask, causal=causal, memory=memory, memory_mask=memory_mask, cache=cache)
        return self.ln_final(x)


class MBart(nn.Module):
    """mBART-50: pre-LN encoder-decoder with a shared, tied vocabulary. `forward` = the logits of
    `MBartForConditionalGeneration`; `generate` = its greedy and beam search."""

    def __init__(self, c: MBartConfig):
        super().__init__()
        self.config = c
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.shared = nn.Embedding(c.vocab_size, c.d_model)  # encoder input, decoder input, output projection
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.register_buffer("final_logits_bias", torch.zeros(c.vocab_size))

    def embed_tokens(self, ids):  # (B, T) -> (B, T, d)
        return self.shared(ids) * self.embed_scale

    def encode(self, input_ids, attention_mask=None):  # (B, S) -> (B, S, d)
        return self.encoder(self.embed_tokens(input_ids), attention_mask)

    def output_projection(self):  # the weight (V, d) and bias (V,) of the logits: the token embedding itself
        return self.shared.weight, self.final_logits_bias

    def logits(self, h):  # (..., d) -> (..., V)
        return F.linear(h, *self.output_projection())

    def forward(self, input_ids, attention_mask, decoder_input_ids):  # -> (B, T, V)
        memory = self.encode(input_ids, attention_mask)
        return self.logits(self.decoder(self.embed_tokens(decoder_input_ids), memory, attention_mask))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, tgt_lang_id=None, num_beams=5, max_new_tokens=60,
                 **search_args):
        """mBART alone, with Hugging Face's semantics (`tgt_lang_id`: its forced_bos_token_id, or None): returns
        the new tokens (B, n), padded: Hugging Face's output without its first column, the decoder start token.
        `search_args`: see decoding.generate."""
        memory = self.encode(input_ids, attention_mask)
        start = torch.full((input_ids.shape[0], 1), self.config.decoder_start_id, device=input_ids.device)
        return decoding.generate(self, memory, attention_mask, self.embed_tokens(start), None, num_beams=num_beams,
                                 max_new_tokens=max_new_tokens, forced_bos_token_id=tgt_lang_id, **search_args)


# -----------------------------------------------------------------------------
# The paper's idea: the mapping network, the prefix layout, and CLIPTrans.


class MappingNetwork(nn.Module):
    """One CLIP vector (B, D) -> the prefix (B, prefix_len, d_model). "A lightweight mapping network
    ... projects the CLIP embedding into a sequence of prefix embeddings." Variants of the official code:
    mlp: Linear(D, P d) + PReLU; hidden_mlp: Linear(D, d), ReLU, Linear(d, P d), PReLU;
    transformer: Linear(D, P d) then one post-LN transformer layer (2 heads, ffn d // 3, ReLU)."""

    def __init__(self, c: MappingConfig, clip_dim, d_model):
        super().__init__()
        self.kind, self.prefix_len, self.d_model = c.kind, c.prefix_len, d_model
        P = c.prefix_len
        if c.kind not in MAPPINGS:
            raise ValueError(f"unknown mapping network {c.kind!r}: expected one of {list(MAPPINGS)}")
        if P == 0:  # the text-only baseline (the official --prefix_length 0): plain mBART, nothing to map
            return
        if c.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(clip_dim, P * d_model), nn.PReLU())
        elif c.kind == "hidden_mlp":
            self.net = nn.Sequential(nn.Linear(clip_dim, d_model), nn.ReLU(), nn.Linear(d_model, P * d_model),
                                     nn.PReLU())
        else:  # transformer
            self.net = nn.Linear(clip_dim, P * d_model)
            self.block = Block(d_model, 2, d_model // 3, "relu", pre_norm=False, dropout=0.1,
                               attn_dropout=0.1)

    def forward(self, clip_embeds):  # (B, D) -> (B, P, d)
        if self.prefix_len == 0:  # (B, 0, d): the decoder reads `</s> <lang> y1..yn`, as mBART alone does
            return clip_embeds.new_zeros(len(clip_embeds), 0, self.d_model)
        dtype = next(self.parameters()).dtype
        prefix = self.net(clip_embeds.to(dtype)).view(-1, self.prefix_len, self.d_model)
        return self.block(prefix) if self.kind == "transformer" else prefix


def prefix_mask(prefix_len, length, device=None):
    """Decoder self-attention mask for `</s> P1..Pp <lang> y1..yn` (True = may attend), (length, length).
    Causal, except that the prefix is bidirectional: every prefix vector sees all the others.
    Position 0 (`</s>`) sees only itself; every later position sees the whole prefix."""
    i = torch.arange(length, device=device)
    in_prefix = (i >= 1) & (i <= prefix_len)
    return (i[None, :] <= i[:, None]) | (in_prefix[:, None] & in_prefix[None, :])


def teacher_forcing(targets, c: MBartConfig):
    """targets (B, L) `<lang> y1..yn </s>`, right-padded -> the decoder's input ids `</s> <lang> y1..yn` (the
    targets shifted right, as mBART's `shift_tokens_right`) and its labels: the targets, padding at -100 (no
    loss). mBART's own recipe, which CLIPTrans inserts its prefix into (and stage 0's denoiser uses as it is)."""
    eos = targets.new_full((targets.shape[0], 1), c.eos_id)
    return torch.cat([eos, targets[:, :-1]], dim=1), targets.masked_fill(targets == c.pad_id, -100)


class CLIPTrans(nn.Module):
    """The two towers, the mapping network and mBART-50.

    Decoder layout, the same for training and generation:

        input:  </s>      P1 .. P10   <lang>  y1 .. yn
        label:  <lang>    -100 x 10   y1      y2 .. </s>

    The official code generates from `P1..P10 </s>` although it trains on the layout above; here one
    layout serves both, so generation continues exactly the sequences training saw (`generate`'s
    prompt="official" decodes as the official code does: PROMPTS).
    The prefix vectors are not scaled by sqrt(d) (token embeddings are); positions are added to all.
    With prefix_len 0 the layout is mBART's own, `</s> <lang> y1..yn`: the text-only baseline."""

    def __init__(self, config: CLIPTransConfig):
        super().__init__()
        if config.vision.embed_dim != config.text.embed_dim:
            raise ValueError(f"the towers must share one space: image {config.vision.embed_dim}-d, "
                             f"text {config.text.embed_dim}-d")
        if config.prompt not in PROMPTS:
            raise ValueError(f"unknown prompt layout {config.prompt!r}: expected one of {list(PROMPTS)}")
        self.config = config
        self.vision = VisionTower(config.vision)
        self.text = TextTower(config.text)
        self.mapping = MappingNetwork(config.mapping, config.vision.embed_dim, config.mbart.d_model)
        self.mbart = MBart(config.mbart)
        self.apply(init_weights)

    def new_mapping(self, config: MappingConfig):
        """Replace the mapping network by a freshly initialised one of another kind or prefix length.
        prefix_len 0 leaves plain mBART-50 fine-tuning: the paper's text-only baseline."""
        device = self.mbart.shared.weight.device
        self.config.mapping = config
        self.mapping = MappingNetwork(config, self.config.vision.embed_dim, self.config.mbart.d_model)
        self.mapping.apply(init_weights).to(device)

    def encode_image(self, pixel_values):  # (B, 3, H, W) -> (B, D): stage 1
        return self.vision(pixel_values)

    def encode_text(self, input_ids, attention_mask):  # (B, T) `<s> x </s>` -> (B, D): stage 2 and test time
        return self.text(input_ids, attention_mask)

    def clip_vectors(self, clip_embeds):
        """The mapping network's input (B, D): `clip_embeds` itself (computed once by a frozen tower), or the text
        tower run here on clip_embeds = (ids, mask), (B, T) each, so that it trains too (the official
        --unfreeze_clip)."""
        return clip_embeds if torch.is_tensor(clip_embeds) else self.encode_text(*clip_embeds)

    def decoder_inputs(self, clip_embeds, targets):
        """clip_embeds (B, D); targets (B, L) = `<lang> y1..yn </s>` right-padded.
        Returns the decoder input vectors (B, 1 + P + L - 1, d) and the labels (B, 1 + P + L - 1)."""
        B, P = targets.shape[0], self.config.mapping.prefix_len
        ids, labels = teacher_forcing(targets, self.config.mbart)  # (B, L) each: `</s> <lang> y1..yn`, targets
        tokens = self.mbart.embed_tokens(ids)  # (B, L, d)
        prefix = self.mapping(clip_embeds).to(tokens.dtype)  # (B, P, d)
        embeds = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)
        labels = torch.cat([labels[:, :1], labels.new_full((B, P), -100), labels[:, 1:]], dim=1)
        return embeds, labels

    def forward(self, clip_embeds, input_ids, attention_mask, targets):
        """One training step of either stage: the mean cross-entropy over the target tokens.
        clip_embeds (B, D): image (stage 1) or source-sentence (stage 2) embeddings (or see clip_vectors);
        input_ids / attention_mask (B, S): the encoder input (stage 1: `<lang> </s>`; stage 2: the source);
        targets (B, L): `<lang> y1..yn </s>`, right-padded."""
        P = self.config.mapping.prefix_len
        embeds, labels = self.decoder_inputs(self.clip_vectors(clip_embeds), targets)
        memory = self.mbart.encode(input_ids, attention_mask)
        mask = prefix_mask(P, embeds.shape[1], embeds.device)  # the prefix bidirectional, the rest causal
        h = self.mbart.decoder(embeds, memory, attention_mask, mask=mask)  # (B, 1 + P + L - 1, d)
        # The vocabulary projection only where a loss can be: position 0 and the targets, not the prefix.
        h, labels = torch.cat([h[:, :1], h[:, P + 1:]], 1), torch.cat([labels[:, :1], labels[:, P + 1:]], 1)
        logits = self.mbart.logits(h)  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())  # ignores -100; fp32 under autocast

    @torch.no_grad()
    def generate(self, clip_embeds, input_ids, attention_mask, tgt_lang_id, num_beams=5, max_new_tokens=60,
                 prompt=None, **search_args):
        """Translate (stage 2) or caption (stage 1): returns the new tokens (B, n), `<lang> y1 .. </s>`,
        padded. `prompt`: the decoder prompt's layout, a key of PROMPTS (default: the config's, "train":
        generation continues the training layout, from `</s> P1..P10`); `<lang>` is forced first either way.
        `search_args`: see decoding.generate."""
        c, clip_embeds = self.config.mbart, self.clip_vectors(clip_embeds)
        B, P = clip_embeds.shape[0], self.config.mapping.prefix_len
        memory = self.mbart.encode(input_ids, attention_mask)
        eos = self.mbart.embed_tokens(torch.full((B, 1), c.eos_id, device=input_ids.device))  # (B, 1, d)
        layout, make_mask = PROMPTS[prompt or self.config.prompt]
        embeds = layout(eos, self.mapping(clip_embeds).to(eos.dtype))  # (B, 1 + P, d)
        mask = make_mask(P, 1 + P, embeds.device)
        return decoding.generate(self.mbart, memory, attention_mask, embeds, mask, num_beams=num_beams,
                                 max_new_tokens=max_new_tokens, forced_bos_token_id=tgt_lang_id,
                                 **search_args)


# The official code's test-time prompt (src/models/model.py, mode 'test'), which is not its training layout: the
# prefix first, then `</s>` ("because for decoder, eos is now start_token_id"), under the decoder mask of its
# patched mBART (modeling_mbart.py): causal, then `combined_attention_mask[:, :, 1:, 1:11] = 0`. Columns 1 to 10
# are visible to every row after the first, hard-coded for a 10-vector prefix: with P = 10, P1 sees only itself,
# P2..P10 and `</s>` see all eleven, `</s>` included; with another P the same ten columns, whatever they hold.


def official_mask(prefix_len, length, device=None):
    """The official code's decoder mask for `P1..Pp </s>` (True = may attend), (length, length); prefix_len is
    not used: its columns are hard-coded."""
    i = torch.arange(length, device=device)
    return (i[None, :] <= i[:, None]) | ((i[:, None] >= 1) & (i[None, :] >= 1) & (i[None, :] <= 10))


# The decoder prompt's layouts: name -> (the prompt from `</s>`'s embedding (B, 1, d) and the prefix (B, P, d),
# its (1 + P, 1 + P) mask). Later positions attend every earlier one, causally, in both.
PROMPTS = {
    "train": (lambda eos, prefix: torch.cat([eos, prefix], dim=1), prefix_mask),  # `</s> P1..Pp`, as trained
    "official": (lambda eos, prefix: torch.cat([prefix, eos], dim=1), official_mask),  # `P1..Pp </s>`
}


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
