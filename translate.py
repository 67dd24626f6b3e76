"""
Translate sentences, or caption images, with a trained CLIPTrans checkpoint.

    python translate.py --checkpoint runs/tiny/stage2/best "A small red circle is above a large blue star."
    echo "A man rides a bike." | python translate.py --checkpoint runs/paper/stage2/best
    python translate.py --checkpoint runs/tiny/stage1/last --image scene.png other.png

Translation needs no image: "at inference, the M-CLIP text embedding of the source sentence replaces the
image embedding". The source and target languages default to the ones the checkpoint was trained on.
Prints one line per input, in order.
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch

import data
import weights


def load(checkpoint, device):
    folder = Path(checkpoint)
    try:
        model = weights.load(folder, device=device)
        _, config = weights.read_config(folder)
        mbart_tok = data.MBartTokenizer(folder / weights.MBART_TOKENIZER)
        text_tok = data.TextTowerTokenizer(folder / weights.TEXT_TOKENIZER)
    except (weights.ConversionError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return model, config.get("train", {}), mbart_tok, text_tok


@torch.no_grad()
def translate(model, mbart_tok, text_tok, sentences, src, tgt, beam=5, max_new_tokens=60, batch_size=32):
    """Source sentences -> target sentences: M-CLIP embedding -> prefix; the source into the mBART encoder."""
    device = next(model.parameters()).device
    out = []
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
    device = next(model.parameters()).device
    size = model.config.vision.image_size
    out = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        try:
            pixels = torch.stack([data.load_image(f, size) for f in chunk])
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        clip = model.encode_image(pixels.to(device))
        src = torch.tensor([[mbart_tok.lang_id(lang), mbart_tok.eos_id]] * len(chunk), device=device)
        tokens = model.generate(clip, src, torch.ones_like(src), mbart_tok.lang_id(lang), num_beams=beam,
                                max_new_tokens=max_new_tokens)
        out += mbart_tok.decode(tokens.cpu())
    return out


def positive(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*", help="sentences to translate (default: one per line on stdin)")
    p.add_argument("--checkpoint", required=True, help="a folder written by train.py (OUT/best or OUT/last)")
    p.add_argument("--image", nargs="+", default=None, help="caption these images instead (a stage 1 checkpoint)")
    p.add_argument("--src", default=None, help="source language (default: the checkpoint's)")
    p.add_argument("--tgt", default=None, help="target / caption language (default: the checkpoint's)")
    p.add_argument("--beam", type=positive, default=5, help="beams (1: greedy)")
    p.add_argument("--max_new_tokens", type=positive, default=60)
    p.add_argument("--batch_size", type=positive, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("PyTorch sees no GPU here")
    except RuntimeError as e:
        p.error(f"--device {a.device}: {e}; expected cpu, cuda or cuda:N")
    model, trained, mbart_tok, text_tok = load(a.checkpoint, a.device)
    stage = trained.get("stage")
    amp = torch.autocast("cuda", torch.bfloat16) if a.device.startswith("cuda") else contextlib.nullcontext()
    try:
        with amp:
            if a.image:
                lang = a.tgt or trained.get("caption_lang", "en")
                lines = caption(model, mbart_tok, a.image, lang, a.beam, a.max_new_tokens, a.batch_size)
            else:
                if stage == 1:
                    print(f"note: {a.checkpoint} is a stage 1 (captioning) checkpoint; translations come "
                          f"from stage 2", file=sys.stderr)
                sentences = a.sentences or [line.rstrip("\n") for line in sys.stdin]
                empty = [i + 1 for i, s in enumerate(sentences) if not s.strip()]
                if not sentences or empty:
                    raise SystemExit("error: expected non-empty sentences, as arguments or one per line on stdin"
                                     + (f"; sentence {', '.join(map(str, empty[:5]))} is empty" if empty else ""))
                lines = translate(model, mbart_tok, text_tok, sentences, a.src or trained.get("src", "en"),
                                  a.tgt or trained.get("tgt", "de"), a.beam, a.max_new_tokens, a.batch_size)
    except ValueError as e:  # an unknown language code, say
        raise SystemExit(f"error: {e}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
