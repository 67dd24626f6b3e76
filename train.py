"""
Train CLIPTrans in its two stages, as the paper does, and score it.

    python train.py --stage 1   # captioning: image embedding -> mapping network -> prefix -> mBART decoder
    python train.py --stage 2   # translation: the same, from the M-CLIP embedding of the source sentence

With no other argument: the tiny preset on the built-in tiny world (en -> de), on any CPU in minutes (stage 1 runs
stage 0 first, stage0.py's stand-ins for the pretrained models). The paper's setting (weights.py's conversion of
the public checkpoints, Multi30k and its images), DDP, scoring a checkpoint, resuming, the text-only baseline:

    python train.py --stage 1 --preset paper --weights weights/paper --data multi30k --images flickr30k-images
    torchrun --nproc_per_node 4 train.py --stage 2 --preset paper --data multi30k --images flickr30k-images
    python train.py --stage 2 --eval_only --test_split val      # the best stage 2 checkpoint, on val
    python train.py --stage 2 --resume                          # continues exactly where `last` left off
    python train.py --stage 2 --prefix_len 0 --out runs/tiny/text_only

The recipe, top to bottom: the tasks, the data, what trains, the step, the loop, the score, `main`. The flags and
their refusals are settings.py's; a run's machinery (starting points, devices, compiling, the feature cache,
checkpoints, exact resume) is runs.py's.
"""

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import folders
import runs
import settings
import stage0
import weights
from runs import Env, Run, Start, log0
from settings import Config

# -----------------------------------------------------------------------------
# The tasks (the official code's --stage, --task here): a row each, a column for each place where they differ. (1)
# The starting point is the stage's: stage 1 tasks start from the converted weights, stage 2 tasks from stage 1's.


@dataclass(frozen=True)
class Task:
    prefix: str  # (2) what a frozen tower embeds for the prefix in training: "image", or "text": the input sentence
    test_prefix: str  # (2) ... when scoring (--test_prefix, or the image with --noise_test)
    pair: bool  # an example is a source and its translation, or one sentence (--caption_lang's), input and target
    noised: bool  # (3) the encoder reads the input with --mask_prob of its tokens dropped always (1, the default:
    #               `<lang> </s>`, "the encoder input is trivial"), or only with --noise_train / --noise_test
    trains: str  # (4) besides the mapping network: "decoder" (mBART's encoder and shared embedding frozen) or "mbart"
    keeps: str  # (5) the checkpoint kept and tested: "last", or "best" (the best validation BLEU)


TASKS = {  # the official README's table
    "caption": Task(prefix="image", test_prefix="image", pair=False, noised=True, trains="decoder", keeps="last"),
    "text_recon": Task(prefix="text", test_prefix="text", pair=False, noised=True, trains="decoder", keeps="last"),
    "translate": Task(prefix="text", test_prefix="text", pair=True, noised=False, trains="mbart", keeps="best"),
    "triplet": Task(prefix="image", test_prefix="text", pair=True, noised=False, trains="mbart", keeps="best"),
}

# -----------------------------------------------------------------------------
# The data: a split read, the prefix's input embedded by a frozen tower, the encoder's input and the target.


@dataclass
class Examples:
    """A split, ready for the model."""
    sentences: dict  # language -> the split's sentences (the references)
    feats: torch.Tensor  # (N, D) the frozen tower's embedding of each example: the mapping network's input
    src_ids: list  # the encoder input of each example (token ids)
    tgt_ids: list  # the target of each example, `[lang] x </s>` (token ids)
    tgt_lang: str
    skipped: list  # the missing images whose examples were dropped (--skip_missing_images)
    text_rows: list = None  # --unfreeze_clip: the text tower's input `<s> x </s>` of each example, instead of feats
    noise: float = 0.0  # the training split's --mask_prob, drawn again every epoch (noised_for)


def prepare(c: Config, split, model, toks, env: Env) -> Examples:
    """A split of --data as the task's row says: (2) the prefix's input, (3) the encoder's, and the target."""
    (task, scored), (mbart_tok, text_tok) = (TASKS[c.task], split != c.train_split), toks
    # (2) the prefix: the image, or the input sentence's text embedding (scored: --test_prefix, else the image
    # with --noise_test, else the task's test prefix)
    image = ((c.test_prefix or ("image" if c.noise_test else task.test_prefix)) if scored else task.prefix) == "image"
    # an example: a source and its translation, or one sentence, input and target (--use_all_langs: the training
    # split once per language of the pair)
    pairs = ([(c.src, c.tgt)] if task.pair else [(c.src, c.src), (c.tgt, c.tgt)] if c.use_all_langs and not scored
             else [(c.caption_lang, c.caption_lang)])
    s = data.read_split(c.data, split, list(dict.fromkeys(x for p in pairs for x in p)),
                        (c.images or str(Path(c.data) / "images")) if image else None,
                        limit=c.n_pairs if split == c.train_split else c.max_eval,
                        skip_missing_images=c.skip_missing_images)
    if s.skipped:
        log0(env.rank, f"{split}: {len(s.skipped)} example(s) dropped, their image missing "
                       f"(--skip_missing_images): {', '.join(s.skipped[:5])}{' ...' * (len(s.skipped) > 5)}")
    # (3) the encoder input: the input sentence, --mask_prob of its tokens dropped always (stage 1: "the encoder
    # input is trivial", `<lang> </s>`) or with --noise_train / --noise_test; drawn once for a scored split
    noise = c.mask_prob if task.noised or (c.noise_test if scored else c.noise_train) else 0.0
    # mBART's positions: the decoder reads `</s> P1..Pp <lang> y1..yn`, P + L positions for a target of L tokens
    positions, P = model.config.mbart.max_positions, model.config.mapping.prefix_len
    parts = []
    for src_lang, tgt_lang in pairs:
        src = cut(mbart_tok.rows(s.sentences[src_lang], src_lang), positions, "source", split, env.rank)
        tgt = cut(mbart_tok.rows(s.sentences[tgt_lang], tgt_lang), positions - P, "target", split, env.rank)
        name, text = f"{split}.text" + f".{src_lang}" * (src_lang != c.src), s.sentences[src_lang]
        if scored and noise:  # drawn once
            src = data.drop_tokens(src, noise, c.seed)
            if c.noise_test:  # (--test_prefix text: the text tower reads the source as the encoder does)
                name, text = f"{split}.mask{noise}.text", mbart_tok.decode(src)
        feats, text_rows = None, None
        if P == 0:  # the text-only baseline: no prefix, so no M-CLIP embedding
            feats = torch.zeros(len(s), 0)
        elif image:
            feats = runs.features(model, c, env, f"{split}.image", images=s.images)
        elif c.unfreeze_clip:  # the text tower trains: it embeds in every step
            text_rows = text_tok.rows(text, model.text.max_tokens)
        else:
            feats = runs.features(model, c, env, name, texts=text, tok=text_tok)
        parts.append(Examples(s.sentences, feats, src, tgt, tgt_lang, s.skipped, text_rows, 0.0 if scored else noise))
    return parts[0] if len(parts) == 1 else dataclasses.replace(  # --use_all_langs: one after the other
        parts[0], feats=None if parts[0].feats is None else torch.cat([p.feats for p in parts]),
        src_ids=sum((p.src_ids for p in parts), []), tgt_ids=sum((p.tgt_ids for p in parts), []),
        text_rows=None if parts[0].text_rows is None else sum((p.text_rows for p in parts), []))


def cut(rows, limit, what, split, rank):  # data.cut, said: an over-long sentence must not stop a run at its step
    if long := [str(i + 1) for i, row in enumerate(rows) if len(row) > limit]:
        log0(rank, f"{split}: {len(long)} {what} sentence(s) cut to mBART's {limit} tokens (line "
                   f"{', '.join(long[:5])}{' ...' * (len(long) > 5)})")
    return data.cut(rows, limit)


def noised_for(ex: Examples, seed, epoch):  # the training split as an epoch reads it: the noise drawn anew
    return dataclasses.replace(ex, src_ids=data.drop_tokens(ex.src_ids, ex.noise, seed * 1000 + epoch)) \
        if ex.noise else ex


# -----------------------------------------------------------------------------
# (4) What trains: the mapping network in every task; in stage 1's the mBART decoder ("the text encoder is
# frozen"), in stage 2's all of mBART.


def trainable(model, task: Task, freeze_decoder=False, unfreeze_clip=False):
    """Freeze all but what `task` trains (in stage 1 mBART's encoder and shared embedding stay frozen);
    --freeze_decoder: the mapping network alone (ClipCap's frozen GPT-2); --unfreeze_clip: the text tower too.
    Returns the rest."""
    model.requires_grad_(False)
    model.mapping.requires_grad_(True)
    if not freeze_decoder:
        (model.mbart.decoder if task.trains == "decoder" else model.mbart).requires_grad_(True)
    model.text.requires_grad_(unfreeze_clip)
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# One training step: forward, loss, backward, the optimizer, over grad_accum micro-batches (bench/bench.py times it).


def micro_batch(ex: Examples, batch, pad_id, config, device, multiple=1):
    """Examples `batch` (indices) as CLIPTrans's inputs on `device`: the prefix's input (B, D) (--unfreeze_clip: the
    text tower's, (B, T) x 2), the encoder input and its mask (B, S), the targets (B, T); S and T the longest row,
    rounded up to `multiple` for a compiled step (the pads are masked and labelled -100: no loss changes). Returns
    them and the batch's target tokens."""
    positions, P = config.mbart.max_positions, config.mapping.prefix_len
    ids, mask = data.pad([ex.src_ids[i] for i in batch], pad_id, multiple, limit=positions)
    tgt, _ = data.pad([ex.tgt_ids[i] for i in batch], pad_id, multiple, limit=positions - P)
    prefix = ex.feats[batch] if ex.text_rows is None else data.pad([ex.text_rows[i] for i in batch],
                                                                    config.text.pad_id, multiple)
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    prefix = to(prefix) if torch.is_tensor(prefix) else tuple(map(to, prefix))
    return (prefix, to(ids), to(mask), to(tgt)), sum(len(ex.tgt_ids[i]) for i in batch)


def train_step(model, opt, scaler, micro, env: Env):
    """One optimizer step over the micro-batches `micro` ([(inputs, target tokens)], from micro_batch). The loss is
    the mean over all target tokens of the global batch: each process divides its sum by the global count, times
    world (DDP averages gradients), over the accumulated micro-batches. Returns that loss."""
    counts = torch.tensor([n for _, n in micro], device=env.device, dtype=torch.float)
    if env.world > 1:
        dist.all_reduce(counts)
    loss_sum = torch.zeros((), device=env.device)
    for j, (inputs, n_tok) in enumerate(micro):
        sync = j == len(micro) - 1  # DDP averages the gradients after the last micro-batch only
        with model.no_sync() if (env.world > 1 and not sync) else contextlib.nullcontext():
            with env.autocast:
                mean = model(*inputs)
            scaler.scale(mean * n_tok / counts.sum() * env.world).backward()
        loss_sum += mean.detach() * n_tok / counts.sum()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if env.world > 1:
        dist.all_reduce(loss_sum)
    return loss_sum


def lr_at(step, c: Config, total):
    """The learning rate of optimizer step `step` (from 0) of `total`."""
    # 1) constant (the paper): c.lr, after a linear warmup for warmup_steps steps when one is asked for
    if c.schedule == "constant":
        return c.lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.lr
    # 2) cosine: a linear warmup for warmup_steps steps
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    # 3) then a cosine decay from c.lr to 0 at step `total`
    return c.lr * 0.5 * (1 + math.cos(math.pi * (step - c.warmup_steps) / max(1, total - c.warmup_steps)))


# -----------------------------------------------------------------------------
# The loop.


def train(c: Config, run: Run, sampler, total, ex: Examples, val: Examples, tok):
    """Optimizer steps of grad_accum micro-batches until `total`, validating at the end of each epoch (or every
    --eval_every steps) and at the end. Returns the target tokens trained on (all processes) and the time taken."""
    env, model = run.env, run.model
    step_model, multiple = runs.compiled_step(model, c.compile, env, sampler, run.epoch, ex, model.config)
    t_start, tokens_seen = time.time(), 0
    bar = tqdm(total=total, initial=run.step, desc=f"stage {c.stage}", disable=env.rank != 0)
    model.train()
    while run.step < total:
        sampler.set_epoch(run.epoch)  # an epoch: the sampler's batches, grad_accum of them per optimizer step
        batches, epoch_ex = list(sampler), noised_for(ex, c.seed, run.epoch)
        usable = len(batches) - len(batches) % c.grad_accum
        t0, pause_t0, tok_window = time.time(), run.pause_s, 0
        while run.batch_in_epoch < usable and run.step < total:
            # forward backward update, over grad_accum micro-batches (see train_step)
            for g in run.opt.param_groups:
                g["lr"] = lr_at(run.step, c, total)
            micro = [micro_batch(epoch_ex, b, tok.pad_id, model.config, env.device, multiple)
                     for b in batches[run.batch_in_epoch:run.batch_in_epoch + c.grad_accum]]
            loss_sum = train_step(step_model, run.opt, run.scaler, micro, env)
            run.step, run.batch_in_epoch = run.step + 1, run.batch_in_epoch + c.grad_accum
            n_tok = sum(n for _, n in micro)
            tok_window, tokens_seen = tok_window + n_tok, tokens_seen + n_tok
            bar.update(1)

            # timing and logging
            if run.step % c.log_every == 0 or run.step == 1 or run.step == total:
                tps = tok_window * env.world / max(time.time() - t0 - (run.pause_s - pause_t0), 1e-9)
                loss_value, lr = loss_sum.item(), lr_at(run.step - 1, c, total)
                if env.rank == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                    run.log(dict(step=run.step, epoch=run.epoch, loss=loss_value, lr=lr, tokens_per_s=round(tps)))
                t0, pause_t0, tok_window = time.time(), run.pause_s, 0

            # evaluation and checkpoints
            if c.eval_every and run.step % c.eval_every == 0:
                validate(c, run, val, tok)
            elif run.step % c.save_every == 0:
                run.save("last")
        # the end of an epoch: a validation, unless --eval_every sets its own rhythm
        if run.batch_in_epoch >= usable:
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
            if not c.eval_every and run.step < total:
                validate(c, run, val, tok)
    bar.close()

    # termination: a last validation (unless the last step had one), and the tokens of every process
    if not c.eval_every or run.step % c.eval_every:
        validate(c, run, val, tok)
    return runs.summed(tokens_seen, env), time.time() - t_start


def validate(c: Config, run: Run, val: Examples, tok):
    """Score the validation split (its hypotheses in OUT/hyps), log it, write `last` and, in stage 2, `best`."""
    t = time.time()
    bleu = score(run.model, c, val, tok, run.env, run.out / "hyps" / f"{c.val_split}.step{run.step}.txt")
    run.pause_s += time.time() - t
    if run.env.rank == 0:
        run.log(dict(step=run.step, epoch=run.epoch, split=c.val_split, bleu=round(bleu, 2)))
        log0(0, f"step {run.step}: {c.val_split} BLEU {bleu:.2f}")
    bleu = runs.rank0s(bleu, run.env)  # every process keeps the same checkpoints: rank 0's BLEU decides
    if TASKS[c.task].keeps == "best" and bleu > run.best:  # (5) the best validation BLEU, or the last
        run.best = bleu
        run.save("best")
    run.save("last")


# -----------------------------------------------------------------------------
# The score: beam search, detokenised hypotheses against the raw references, sacrebleu's corpus BLEU.


@torch.no_grad()
def score(model, c: Config, ex: Examples, tok, env: Env, path):
    """The BLEU of `model` on a prepared split (rank 0's; None elsewhere), its hypotheses written to `path`: every
    rank generates for its share of the split, rank 0 gathers them in the split's order."""
    import sacrebleu
    model.eval()
    sampler = data.LengthBucketSampler([len(s) for s in ex.src_ids], c.eval_batch_size, shuffle=False,
                                       rank=env.rank, world_size=env.world)
    mine = {}
    for batch in tqdm(sampler, desc=f"eval {path.stem}", disable=env.rank != 0, leave=False):
        if not batch:
            continue
        (prefix, ids, mask, _), _ = micro_batch(ex, batch, tok.pad_id, model.config, env.device)
        with env.autocast:
            out = model.generate(prefix, ids, mask, tok.lang_id(ex.tgt_lang), num_beams=c.beam,
                                 max_new_tokens=c.max_new_tokens)
        mine.update(zip(batch, tok.decode(out.cpu())))
    mine = runs.merged(mine, env)  # every process's hypotheses
    model.train()
    if env.rank != 0:
        return None
    refs = ex.sentences[ex.tgt_lang]
    hyps = [mine[i] for i in range(len(refs))]  # every example exactly once, in the split's order
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(hyps) + "\n")
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def evaluate(c: Config, model, toks, start, env: Env):
    """--eval_only: the BLEU of a checkpoint on --test_split, as translate.py would use it (a checkpoint of another
    stage warned about, one whose mapping network never trained refused). --ablate takes one input away: "prefix",
    each sentence gets the previous one's embedding (what the source alone carries); "source", the encoder sees
    only `<src_lang> </s>` (what the prefix alone carries). The hypotheses' file is named by the flags given."""
    job = ("captioning", [c.caption_lang]) if c.stage == 1 else ("translation", [c.src, c.tgt])
    runs.check_trained(start, weights.read_config(start)[1].get("train", {}), *job)
    ex = prepare(c, c.test_split, model, toks, env)
    if c.ablate == "prefix":
        ex = dataclasses.replace(ex, feats=ex.feats.roll(1, dims=0))
    elif c.ablate == "source":
        ex = dataclasses.replace(ex, src_ids=data.drop_tokens(ex.src_ids, 1.0))  # `[src_lang] </s>`
    path = Path(c.out) / "hyps" / f"{c.test_split}.eval{settings.scored_as(c)}.txt"
    bleu = score(model, c, ex, toks[0], env, path)
    if env.rank == 0:
        print(json.dumps({"split": c.test_split, "bleu": round(bleu, 2), "checkpoint": str(start),
                          "hypotheses": str(path), **({"ablate": c.ablate} if c.ablate else {})}))


# -----------------------------------------------------------------------------
# Stages 1 and 2: the recipe.


@runs.refused
def main(argv=None):
    # settings; where this process runs (with the data: the default tiny world is made on first use)
    c = settings.parse_args(argv, __doc__)
    env = runs.setup(c.device, c.dtype, c.allow_large_images, c.data)
    if c.stage == 0:  # the tiny preset's stand-ins for the pretrained models (stage0.py, rank 0 alone)
        stage0.run(c, env)
        return runs.end(env)

    # (1) the starting point; the tiny preset's stage 0 first when it is missing. The seed is set after: a run is
    # the same whether stage 0 had to run or not
    task = TASKS[c.task]
    start, kind = runs.starting_point(c, task.keeps)
    if kind is Start.WEIGHTS and c.preset == "tiny" and not folders.find_checkpoint(start).exists():
        log0(env.rank, f"stage 0 output {start} is missing: running stage 0 first")
        stage0.run(settings.for_stage0(c, start.parent), env)
    torch.manual_seed(c.seed + env.rank)
    random.seed(c.seed + env.rank)
    model, start = runs.load_model(start, c, env.device, kind)
    toks = data.MBartTokenizer(start / weights.MBART_TOKENIZER), data.TextTowerTokenizer(start / weights.TEXT_TOKENIZER)
    if c.eval_only:
        evaluate(c, model, toks, start, env)
        return runs.end(env)

    # the data and the frozen towers' features: (2) the prefix's input, (3) the encoder's. Every split the run
    # scores is read and checked before the first step, not found broken after the last
    train_set, val_set, test_set = (prepare(c, split, model, toks, env)
                                    for split in (c.train_split, c.val_split, c.test_split))

    # (4) what trains, with AdamW and (fp16) a gradient scaler, in batches of examples of similar length
    params = trainable(model, task, c.freeze_decoder, c.unfreeze_clip)
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=c.weight_decay,
                            fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=env.dtype == "fp16")
    sampler, steps_per_epoch = runs.sampler(c, [len(t) for t in train_set.tgt_ids], env)
    total = c.max_steps or steps_per_epoch * c.epochs
    runs.plan_disk(c.out, model, params, task.keeps == "best", c.ignore_disk_space, env.rank, c.unfreeze_clip)

    # the loop, from the start or (--resume) exactly where the checkpoint left off
    run = Run(dataclasses.asdict(c), settings.resume_same(c), env, model, opt, scaler, start, resume=c.resume,
              share_towers=not c.unfreeze_clip, skipped={split: ex.skipped for split, ex in zip(
                  (c.train_split, c.val_split, c.test_split), (train_set, val_set, test_set))})
    log0(env.rank, f"stage {c.stage} ({c.task}): {len(train_set.tgt_ids)} examples, {steps_per_epoch} steps per "
                   f"epoch, {total} steps, {env.world} process(es) on {env.device}, {env.dtype}; training "
                   f"{sum(p.numel() for p in params):,} parameters")
    tokens_seen, elapsed = train(c, run, sampler, total, train_set, val_set, toks[0])

    # (5) the final test of the kept checkpoint: `last` in stage 1, `best` in stage 2
    kept = run.out / task.keeps
    model = runs.load_model(kept, c, env.device, Start.CHECKPOINT)[0] if task.keeps == "best" else model
    test_bleu = score(model, c, test_set, toks[0], env, run.out / "hyps" / f"{c.test_split}.final.txt")
    if env.rank == 0:  # (the BLEU is rank 0's)
        run.finish(dict(stage=c.stage, task=c.task, steps=run.step, minutes=round(elapsed / 60, 2),
                        tokens_per_s=round(tokens_seen / max(elapsed - run.pause_s, 1e-9)),
                        best_val_bleu=round(run.best, 2) if task.keeps == "best" else None, test_split=c.test_split,
                        test_bleu=round(test_bleu, 2), checkpoint=str(kept)))
    runs.end(env)


if __name__ == "__main__":
    main()
