"""
Translate sentences, or caption images, with a trained CLIPTrans checkpoint.

    python translate.py --checkpoint runs/tiny/stage2/best "A small red circle is above a large blue star."
    echo "A man rides a bike." | python translate.py --checkpoint runs/paper/stage2/best
    python translate.py --checkpoint runs/tiny/stage1/last --image scene.png other.png

Translation needs no image: "at inference, the M-CLIP text embedding of the source sentence replaces the
image embedding". The languages default to the checkpoint's. Prints one line per input, in order. Input is UTF-8;
a sentence longer than mBART's positions is refused, with its number, before any is translated. A checkpoint
asked for what it was not trained to do gets a warning; one whose mapping network never trained is refused.
"""

import argparse
import codecs
import sys
from pathlib import Path

import torch

import cliptrans
import data
import runs
import weights


def load(checkpoint, device):
    """A checkpoint's model, its training settings (config.json's "train" section) and its two tokenizers."""
    folder = Path(checkpoint)
    model, config = weights.load(folder, device=device), weights.read_config(folder)[1]
    mbart_tok = data.MBartTokenizer(folder / weights.MBART_TOKENIZER)
    return model, config.get("train", {}), mbart_tok, data.TextTowerTokenizer(folder / weights.TEXT_TOKENIZER)


@torch.no_grad()
def translate(model, mbart_tok, text_tok, sentences, src, tgt, beam=5, max_new_tokens=60, batch_size=32):
    """Source sentences -> target sentences: M-CLIP embedding -> prefix; the source into the mBART encoder."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(sentences), batch_size):
        chunk = sentences[i:i + batch_size]
        ids, mask = text_tok.encode(chunk, max_len=model.text.max_tokens)  # as XLM-R, cut at the tower's length
        clip = model.encode_text(ids.to(device), mask.to(device))
        src_ids, src_mask = mbart_tok.encode(chunk, src)
        tokens = model.generate(clip, src_ids.to(device), src_mask.to(device), mbart_tok.lang_id(tgt),
                                num_beams=beam, max_new_tokens=max_new_tokens)
        out += mbart_tok.decode(tokens.cpu())
    return out


@torch.no_grad()
def caption(model, mbart_tok, files, lang, beam=5, max_new_tokens=60, batch_size=32):
    """Images -> captions: CLIP image embedding -> prefix; the encoder sees only `<lang> </s>` (stage 1)."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        pixels = torch.stack([data.load_image(f, model.config.vision.image_size) for f in chunk])
        clip = model.encode_image(pixels.to(device))
        src, mask = mbart_tok.encode([""] * len(chunk), lang)  # (B, 2) each: the empty sentence, `<lang> </s>`
        tokens = model.generate(clip, src.to(device), mask.to(device), mbart_tok.lang_id(lang), num_beams=beam,
                                max_new_tokens=max_new_tokens)
        out += mbart_tok.decode(tokens.cpu())
    return out


def read_sentences(sentences, mbart_tok, lang, n):
    """The sentences to translate, from the arguments or one per line of stdin, each checked before any is
    translated: not empty, valid UTF-8, at most mBART's `n` positions long (its language code and </s> included)."""
    name = "sentence" if sentences else "line"  # what a message calls one: "sentence 3", "line 3" of stdin
    if not sentences:  # bytes, decoded as argv is (surrogateescape): bad UTF-8 is refused below, with its line
        raw = sys.stdin.buffer.read().removeprefix(codecs.BOM_UTF8)  # a BOM is no part of the first sentence
        sentences = [line.decode("utf-8", "surrogateescape") for line in raw.splitlines()]
    empty = [i + 1 for i, s in enumerate(sentences) if not s.strip()]
    if not sentences or empty:
        raise ValueError("expected non-empty sentences, as arguments or one per line on stdin"
                         + (f"; {name} {', '.join(map(str, empty[:5]))} is empty" if empty else ""))
    for i, s in enumerate(sentences, 1):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name} {i} is not valid UTF-8 (at character {e.start + 1}): expected UTF-8 text; "
                             f"convert it (e.g. iconv -f latin1 -t utf-8) or set the terminal to UTF-8") from None
    long = [f"{name} {i} ({len(r)} tokens)" for i, r in enumerate(mbart_tok.rows(sentences, lang), 1) if len(r) > n]
    if long:  # the text tower cuts its input (as XLM-R's tokenizer does); mBART's encoder has no such cut
        raise ValueError(f"expected at most {n} tokens a sentence (mBART's encoder has {n} positions; its language "
                         f"code and </s> count), found {', '.join(long[:5])}{' ...' * (len(long) > 5)}: split them "
                         f"into shorter sentences (nothing was translated)")
    return sentences


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*", help="sentences to translate (default: one per line on stdin)")
    p.add_argument("--checkpoint", required=True, help="a folder written by train.py (OUT/best or OUT/last)")
    p.add_argument("--image", nargs="+", default=None, help="caption these images instead (a stage 1 checkpoint)")
    p.add_argument("--src", default=None, help="source language (default: the checkpoint's)")
    p.add_argument("--tgt", default=None, help="target / caption language (default: the checkpoint's)")
    p.add_argument("--beam", type=positive, default=5, help="beams (1: greedy)")
    p.add_argument("--max_new_tokens", type=positive, default=60)
    p.add_argument("--prompt", default=None, choices=tuple(cliptrans.PROMPTS),
                   help="the decoder's prompt: train (`</s> P1..Pp`, as training) or official (the official "
                        "code's `P1..Pp </s>` and its mask: see train.py --help) (default: the checkpoint's)")
    p.add_argument("--batch_size", type=positive, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: a GPU when there is one)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="autocast's precision, "
                   "as train.py's (auto: bf16 on GPUs that have it, else fp16; fp32 on a CPU)")
    p.add_argument("--allow_large_images", action="store_true",
                   help="lift pillow's limit on image pixels (a guard against decompression bombs)")
    return p.parse_args(argv)


@runs.refused  # a checkpoint, a language or an input refused: one line, no traceback
def main(argv=None):
    a = parse_args(argv)
    env = runs.setup(a.device, a.dtype, a.allow_large_images)  # the device and autocast, as train.py's
    model, trained, mbart_tok, text_tok = load(a.checkpoint, env.device)
    model.config.prompt = a.prompt or model.config.prompt
    with env.autocast:
        if a.image:
            lang = a.tgt or trained.get("caption_lang") or "en"
            runs.check_trained(a.checkpoint, trained, "captioning", [lang])
            lines = caption(model, mbart_tok, a.image, lang, a.beam, a.max_new_tokens, a.batch_size)
        else:
            src, tgt = a.src or trained.get("src", "en"), a.tgt or trained.get("tgt", "de")
            runs.check_trained(a.checkpoint, trained, "translation", [src, tgt])
            sentences = read_sentences(a.sentences, mbart_tok, src, model.config.mbart.max_positions)
            lines = translate(model, mbart_tok, text_tok, sentences, src, tgt, a.beam, a.max_new_tokens, a.batch_size)
    print(*lines, sep="\n")


if __name__ == "__main__":
    main()
