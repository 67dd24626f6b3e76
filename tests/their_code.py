"""The official CLIPTrans code (devaansh100/CLIPTrans at 698a0bd), re-typed where the tests need it: what its
files hold and how it decodes. Not collected by pytest (its name does not start with test_).

- src/models/adapters.py: the three mapping networks, with their attribute names (the keys of their files);
- src/models/model.py: the saved module (`adapter`, `mbart`, and `clip` when trained with --unfreeze_clip) and
  its test-time prompt, `P1..Pp </s>`;
- src/runner.py: save_model's training dict; the released models' flat shards; DDP's `module.`;
- the patched modeling_mbart.py of their transformers fork: the decoder mask of
  `_prepare_decoder_attention_mask`, `combined_attention_mask[:, :, 1:, 1:11] = 0`, and
  `prepare_inputs_for_generation` (the prompt's embeddings at the first step, then the last token).
The reference decoding runs Hugging Face's MBartForConditionalGeneration.generate of the installed transformers,
handed their prompt and their mask at the first step."""

import re

import torch
import torch.nn as nn
import transformers

import official
import weights

# ----------------------------------------------------------------------------- src/models/adapters.py


class MLPAdapter(nn.Module):
    def __init__(self, clip_dim, mbart_dim, prefix_length):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(clip_dim, prefix_length * mbart_dim), nn.PReLU())
        self.prefix_length, self.mbart_dim = prefix_length, mbart_dim

    def forward(self, x):
        return self.hidden(x.float()).view(-1, self.prefix_length, self.mbart_dim)


class HiddenMLPAdapter(MLPAdapter):
    def __init__(self, clip_dim, mbart_dim, prefix_length):
        super().__init__(clip_dim, mbart_dim, prefix_length)
        self.hidden = nn.Sequential(nn.Linear(clip_dim, mbart_dim), nn.ReLU(),
                                    nn.Linear(mbart_dim, prefix_length * mbart_dim), nn.PReLU())


class TransformerAdapter(nn.Module):
    def __init__(self, clip_dim, mbart_dim, prefix_length, num_encoder_layers=1):
        super().__init__()
        self.prefix_length, self.mbart_dim = prefix_length, mbart_dim
        self.projector = nn.Linear(clip_dim, prefix_length * mbart_dim)
        layer = nn.TransformerEncoderLayer(d_model=mbart_dim, nhead=2, dim_feedforward=mbart_dim // 3,
                                           batch_first=True)
        self.transformer = nn.TransformerEncoder(encoder_layer=layer, num_layers=num_encoder_layers,
                                                 enable_nested_tensor=False)

    def forward(self, x):
        return self.transformer(self.projector(x).view(-1, self.prefix_length, self.mbart_dim))


ADAPTERS = {"mlp": MLPAdapter, "hidden_mlp": HiddenMLPAdapter, "transformer": TransformerAdapter}


def random_adapter(kind, clip_dim, mbart_dim, prefix_length, seed=0):
    """An adapter with every weight random (LayerNorms and PReLU slopes too: defaults hide swapped or missing
    parts), large enough that the prefix steers the decoder."""
    torch.manual_seed(seed)
    adapter = ADAPTERS[kind](clip_dim, mbart_dim, prefix_length)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if re.search(r"norm\d\.weight", name):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.numel() == 1:  # PReLU's slope
                p.fill_(0.6)
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return adapter.eval()


# ----------------------------------------------------------------------------- src/models/model.py


class CLIPTransModule(nn.Module):
    """What their training saves: `adapter` and `mbart`; `clip` (text_encoder: M-CLIP, image_encoder: a CLIPModel)
    only for --unfreeze_clip, as `del model.clip` drops the frozen M-CLIP otherwise."""

    def __init__(self, adapter, mbart, clip=None):
        super().__init__()
        self.adapter, self.mbart = adapter, mbart
        if clip is not None:
            self.clip = clip


class MClip(nn.Module):  # clip_comb.M_CLIP: the module names of their --unfreeze_clip files
    def __init__(self, text_encoder, image_encoder):
        super().__init__()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder


# ----------------------------------------------------------------------------- src/runner.py: the files


def save_training_dict(module, path, ddp=False):
    """save_model: {'model', 'optimizer', 'scaler', 'epoch', 'best_bleu_test'}; under DDP every key `module.`."""
    state = {("module." if ddp else "") + k: v for k, v in module.state_dict().items()}
    param = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=1e-5)
    param.grad = torch.ones_like(param)
    opt.step()  # an optimizer state with tensors in it, as after training
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}
    torch.save({"model": state, "optimizer": opt.state_dict(), "scaler": scaler, "epoch": 7,
                "best_bleu_test": 41.3}, path)
    return path


def save_shards(module, folder, name="model_best_test", shards=2, ddp=True):
    """A released model: flat partial state dicts X_1.pth, X_2.pth, ... (keys `module.` as trained under DDP)."""
    items = [(("module." if ddp else "") + k, v) for k, v in module.state_dict().items()]
    paths = []
    for i in range(shards):
        paths.append(folder / f"{name}_{i + 1}.pth")
        torch.save(dict(items[i::shards]), paths[-1])
    return paths


def from_ours(model, kind):
    """Our CLIPTrans (mBART and mapping network) as their module: each of their keys filled from ours by the
    converter's rules run backwards (q, k and v rows taken out of our fused matrix)."""
    c = model.config.mbart
    hf = transformers.MBartForConditionalGeneration(transformers.MBartConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
        encoder_attention_heads=c.heads, decoder_attention_heads=c.heads, encoder_ffn_dim=c.ffn,
        decoder_ffn_dim=c.ffn, max_position_embeddings=c.max_positions, scale_embedding=c.scale_embedding,
        pad_token_id=c.pad_id, bos_token_id=c.bos_id, eos_token_id=c.eos_id, decoder_start_token_id=c.eos_id,
        tie_word_embeddings=True))
    module = CLIPTransModule(ADAPTERS[kind](model.config.text.embed_dim, c.d_model, model.config.mapping.prefix_len),
                             hf)
    ours = model.state_dict()
    rules = official.OFFICIAL_ADAPTERS[kind][1] + official.under("mbart.", weights.MBART_RULES)
    state = {}
    for key, value in module.state_dict().items():
        pattern, target = next((p, t) for p, t in rules if re.fullmatch(p, key))
        m = re.fullmatch(pattern, key)
        tensor = ours[m.expand(target)]
        qkv = next((g for g in m.groups() if g in weights.QKV_ORDER), None)
        if qkv is not None and ".qkv." in m.expand(target):
            tensor = tensor.chunk(3)[weights.QKV_ORDER[qkv]]
        state[key] = tensor.reshape(value.shape).clone()
    module.load_state_dict(state)
    return module


# ----------------------------------------------------------------------------- their decoding


def decoder_mask(batch, length, dtype, patched=True):
    """Their patched `_prepare_decoder_attention_mask` for a prompt of `length` > 1 rows and an all-ones
    decoder_attention_mask, (batch, 1, length, length), additive: `_make_causal_mask`, plus the expanded
    all-ones mask (zeros), then their line (patched=False: the causal mask alone)."""
    mask = torch.full((length, length), torch.finfo(dtype).min).triu(1)[None, None].repeat(batch, 1, 1, 1)
    if patched:
        mask[:, :, 1:, 1:11] = 0.0  # "After eos predicts lid, priming the decoder to always see the image embeddings"
    return mask


class PatchedMBart(transformers.MBartForConditionalGeneration):
    """Their patched prepare_inputs_for_generation, at the level of forward: the first step reads the prompt's
    embeddings under `decoder_mask`; later steps read the last token, and a single row sees every column."""
    prompt, patched = None, True

    def forward(self, *args, decoder_input_ids=None, cache=None, **kw):
        if cache is None or cache.get_seq_length() == 0:
            rows = decoder_input_ids.shape[0]  # num_beams copies of each sentence, in order
            embeds = self.prompt.repeat_interleave(rows // len(self.prompt), dim=0)
            mask = decoder_mask(rows, embeds.shape[1], embeds.dtype, self.patched).to(embeds.device)
            return super().forward(*args, decoder_inputs_embeds=embeds, decoder_attention_mask=mask, cache=cache, **kw)
        return super().forward(*args, decoder_input_ids=decoder_input_ids, cache=cache, **kw)


def patched(hf_mbart):
    """A PatchedMBart with the weights of `hf_mbart` (eager attention, as their transformers had)."""
    model = PatchedMBart(hf_mbart.config)
    model.load_state_dict(hf_mbart.state_dict())
    return model.eval().to(next(hf_mbart.parameters()).device)


@torch.no_grad()
def prompt(adapter, mbart, clip_embeds):
    """Their test-time decoder input: `cat(prefix, embed(</s>))`, "putting prefix_embeds before eos, because for
    decoder, eos is now start_token_id" (transformers 5's embed_tokens applies embed_scale itself)."""
    eos = torch.full((len(clip_embeds), 1), 2, device=clip_embeds.device)
    return torch.cat([adapter(clip_embeds), mbart.model.decoder.embed_tokens(eos)], dim=1)


@torch.no_grad()
def generate(adapter, mbart: PatchedMBart, clip_embeds, input_ids, attention_mask, tgt_lang_id, num_beams,
             max_new_tokens=60, patched=True):
    """Their `mode == 'test'`: generate(forced_bos_token_id=<tgt>, max_new_tokens=60) with mbart-large-50's
    generation settings (early stopping, length penalty 1, </s> forced at the end). Returns the new tokens
    (B, n), Hugging Face's output less its decoder start token."""
    mbart.prompt, mbart.patched = prompt(adapter, mbart, clip_embeds), patched
    out = mbart.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams,
                         max_new_tokens=max_new_tokens, forced_bos_token_id=tgt_lang_id, do_sample=False,
                         early_stopping=True, length_penalty=1.0)
    return out[:, 1:]
