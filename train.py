"""
Train CLIPTrans in its two stages, as the paper does, and score it.

    python train.py --stage 1   # captioning: image embedding -> mapping network -> prefix -> mBART decoder
    python train.py --stage 2   # translation: the same, from the M-CLIP embedding of the source sentence
    python train.py --stage 0   # tiny preset only: stand-ins for the pretrained models (see stage0.py)

With no other argument this runs the tiny preset on the built-in tiny world (en -> de) on any CPU, in
minutes; stage 1 runs stage 0 first when its output is missing, and says so. The paper's setting (after
the weights converted by weights.py into weights/paper, with Multi30k and its images), and DDP with one process per GPU:

    python train.py --stage 1 --preset paper --weights weights/paper --data multi30k --images flickr30k-images
    python train.py --stage 2 --preset paper --data multi30k --images flickr30k-images
    torchrun --nproc_per_node 4 train.py --stage 2 --preset paper ...

Scoring a checkpoint on any split, and resuming after an interruption:

    python train.py --stage 2 --eval_only --test_split val      # the best stage 2 checkpoint, on val
    python train.py --stage 2 --eval_only --ablate prefix       # ... with another sentence's prefix
    python train.py --stage 2 --resume                          # continues exactly where `last` left off

The paper's baseline, mBART-50 fine-tuned on the text alone (no prefix, no M-CLIP, no stage 1):

    python train.py --stage 2 --prefix_len 0 --out runs/tiny/text_only

One recipe (`main`) serves every task. The official code's four (its --stage; `--task` here) are the rows of
the table TASKS, whose columns are the places where they differ, marked (1) to (5) in the code:

                (1) starts from   (2) the prefix embeds     (3) the encoder reads    writes      (4) trains   (5) keeps
    caption     the weights       the image                 `<lang> </s>`            the caption  decoder      last
    text_recon  the weights       the sentence (M-CLIP)     `<lang> </s>`            the sentence decoder      last
    translate   a stage 1 ckpt    the source (M-CLIP)       the source               the target   all mBART    best
    triplet     a stage 1 ckpt    the image; test: source   the source               the target   all mBART    best

Stage 1 is captioning (caption) unless --task says otherwise, stage 2 translation (translate). The switches
of the official code: --use_all_langs (stage 1 in both languages), --noise_train / --noise_test with
--mask_prob (source tokens dropped; --noise_test also gives the prefix the image), --unfreeze_clip (the text
tower trains in stage 2).

Every checkpoint folder (`OUT/last`, `OUT/best`) holds the model (`cliptrans.safetensors`, `config.json`,
the tokenizers: `weights.load` and translate.py read it) and the training state (`state.pt`: optimizer,
scaler, step, RNG states; loads with `torch.load(weights_only=True)`), written atomically. `--help` says which
stages each flag applies to: given in another, it is refused, never ignored.
"""

import argparse
import contextlib
import dataclasses
import enum
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import decoding
import folders
import stage0
import tiny_world
import weights
from cliptrans import PROMPTS, Attention, CLIPTransConfig, MappingConfig
import runs
from runs import Env, Run, compile_mode, compiled, log0, plan_disk, setup

# -----------------------------------------------------------------------------
# Settings. Every field is a command-line flag (`--batch_size 32`); unknown flags are errors. What is left at
# 0 / empty is filled from the preset and stage by `defaults()`; `check()` refuses what cannot run. Each flag
# names the stages it means something in: given in another stage, it is refused, never ignored.

ALL, TRAINED = (0, 1, 2), (1, 2)  # every stage; the stages that train CLIPTrans (stage 0 makes its stand-ins)


def flag(default, text, stages=ALL, kept=False):
    """A setting: its --help text, the stages it applies to, and whether --resume must keep it (`kept`: it changes
    what the run learns: the data, its order, the model, the optimizer)."""
    return dataclasses.field(default=default, metadata={"help": text, "stages": stages, "kept": kept})


@dataclass
class Config:
    stage: int = flag(1, "0: tiny stand-ins for the pretrained models; 1: captioning; 2: translation", kept=True)
    task: str = flag("", "what the stage trains on, a row of TASKS (the official code's --stage): caption or "
                         "text_recon in stage 1, translate or triplet in stage 2 (default: caption, translate); "
                         "given alone, it sets --stage", TRAINED, kept=True)
    preset: str = flag("tiny", "the model sizes and the recipe: tiny, or the paper's", kept=True)
    weights: str = flag("", "starting weights: a folder from weights.py (paper) or stage 0 (tiny; default: "
                            "runs/tiny/stage0/last); stage 2 starts from them with --from_scratch_stage2 or "
                            "--prefix_len 0", TRAINED, kept=True)
    init: str = flag("", "the stage 1 checkpoint stage 2 starts from (default: stage 1's `last`)", (2,), kept=True)
    data: str = flag("", "a folder in the Multi30k layout (default: the tiny world)")
    images: str = flag("", "the images folder (default: DATA/images)")
    features: str = flag("", "where the frozen towers' features are cached (default: DATA/features)", TRAINED)
    src: str = flag("en", "the source language (stage 1: of the pair whose captions it learns)", TRAINED, kept=True)
    tgt: str = flag("de", "the target language", TRAINED, kept=True)
    caption_lang: str = flag("", "stage 1's caption language (default, as the official code: English when "
                                 "--src or --tgt is English; for a pair without English it must be given)", (1,), kept=True)
    train_split: str = flag("train", "the split to train on", kept=True)
    val_split: str = flag("val", "the split to validate on (stage 2 keeps the checkpoint best on it; stage 0 "
                                 "measures the towers' retrieval on it)")
    test_split: str = flag("", "the split scored at the end of training, or by --eval_only (tiny world: test; "
                               "Multi30k: test_2016_flickr)", TRAINED)
    n_pairs: int = flag(0, "use only the first n training examples (0: all); the low-resource experiment", kept=True)
    mapping: str = flag("", "a new mapping network of this kind (mlp, hidden_mlp, transformer) where one "
                            "starts untrained (default: the starting weights'; stage 0 and weights.py: mlp)", kept=True)
    prefix_len: int = flag(-1, "a new mapping network with this many prefix vectors (-1: the starting "
                               "weights'; stage 0: 10); 0: no prefix, the text-only mBART baseline (stage 2 only)", kept=True)
    batch_size: int = flag(0, "examples per micro-batch, per process (default: the preset's, for the stage)", kept=True)
    grad_accum: int = flag(0, "micro-batches per optimizer step; the loss is divided accordingly (default: "
                              "paper 4, tiny 1)", TRAINED, kept=True)
    epochs: int = flag(0, "passes over the training split (default: the preset's, for the stage)")
    max_steps: int = flag(0, "stop after this many optimizer steps (0: run all epochs)", TRAINED)
    lr: float = flag(0.0, "AdamW's learning rate (default: the preset's, for the stage)", kept=True)
    schedule: str = flag("constant", "constant (the paper), or cosine (linear warmup, cosine decay to 0)", TRAINED, kept=True)
    warmup_steps: int = flag(0, "steps of linear warmup (0: none)", TRAINED, kept=True)
    weight_decay: float = flag(0.0, "AdamW's weight decay (0: none)", TRAINED, kept=True)
    dropout: float = flag(-1.0, "override the model's dropout (-1: keep it)", TRAINED, kept=True)
    eval_every: int = flag(0, "evaluate every n steps (0: at the end of each epoch)", TRAINED)
    save_every: int = flag(100, "write `last` every n steps (and at every evaluation)", TRAINED)
    log_every: int = flag(10, "log the training loss every n steps")
    beam: int = flag(5, "beams in evaluation (1: greedy)", TRAINED)
    max_new_tokens: int = flag(60, "the longest hypothesis, in tokens", TRAINED)
    eval_batch_size: int = flag(64, "sentences per evaluation batch, per process", TRAINED)
    max_eval: int = flag(0, "evaluate on the first n examples only (0: all)", TRAINED)
    seed: int = flag(29, "seeds the model's initialisation, the data order and dropout", kept=True)
    dtype: str = flag("auto", "auto: bf16 on GPUs that have it, else fp16 + GradScaler; fp32 on CPU (stage 0: "
                              "fp32 always)", TRAINED)
    compile: str = flag("auto", "torch.compile's mode for the training step: auto (one GPU: reduce-overhead, "
                                "the fastest bench.py measured; several (DDP): default; CPU: none), none "
                                "(eager), default, reduce-overhead (CUDA graphs), max-autotune", TRAINED)
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    skip_missing_images: bool = flag(False, "drop the examples whose image file is missing, as the official "
                                            "WIT loader does (default: a missing image is an error)", TRAINED, kept=True)
    ignore_disk_space: bool = flag(False, "start even when --out's disk looks too small for the checkpoints",
                                   TRAINED)
    allow_large_images: bool = flag(False, "lift pillow's limit on image pixels (a decompression-bomb guard)")
    langs: str = flag("en de fr", "the languages stage 0's stand-ins learn (leave one out: a language the towers "
                                  "and mBART never saw)", (0,))
    out: str = flag("", "the run's folder (default: runs/PRESET/stageSTAGE)")
    checkpoint: str = flag("", "--eval_only / --resume: the checkpoint (default: OUT/best or OUT/last)", TRAINED)
    resume: bool = flag(False, "continue the run in OUT exactly where its `last` checkpoint left off", TRAINED)
    eval_only: bool = flag(False, "score a checkpoint on --test_split instead of training", TRAINED)
    from_scratch_stage2: bool = flag(False, "the ablation: stage 2 without stage 1, from --weights", (2,), kept=True)
    freeze_decoder: bool = flag(False, "the ablation: stage 1 trains the mapping network alone, mBART frozen",
                                (1,), kept=True)
    test_prefix: str = flag("", "what the prefix is made from when stage 2 scores: image, or text, the source as "
                                "the encoder reads it (with --noise_test, its tokens dropped) (default: the "
                                "task's, the source; with --noise_test, the image, as the official code)", (2,))
    use_all_langs: bool = flag(False, "stage 1 trains on the sentences of both languages of the pair, not of "
                                      "--caption_lang alone: its training split once per language, as the "
                                      "official --use_all_langs (validation and test stay in --caption_lang)", (1,), kept=True)
    mask_prob: float = flag(1.0, "the share of the encoder input's tokens dropped, its language code and </s> kept "
                                 "(the official --mask_prob): in stage 1 always (1: `<lang> </s>`, the trivial "
                                 "input), in stage 2 with --noise_train or --noise_test", TRAINED, kept=True)
    noise_train: bool = flag(False, "stage 2 trains on sources with --mask_prob of their tokens dropped, drawn "
                                    "again every epoch (with the default --mask_prob 1, as the official code's: "
                                    "none of their words)", (2,), kept=True)
    noise_test: bool = flag(False, "stage 2 scores sources with --mask_prob of their tokens dropped, and the prefix "
                                   "from the image (the official --noise_test; --mask_prob 0: --test_prefix image)",
                            (2,))
    unfreeze_clip: bool = flag(False, "the translate task fine-tunes M-CLIP's text tower with the rest: the prefix "
                                      "is embedded in every step, never cached, and every checkpoint holds its "
                                      "own towers", (2,), kept=True)
    prompt: str = flag("", "the decoder's prompt when generating: train (`</s> P1..Pp`, the layout training "
                           "uses) or official (the official code's at test time: `P1..Pp </s>` under its patched "
                           "mask, which shows columns 1 to 10 to every row after the first whatever --prefix_len: "
                           "with other than 10 prefix vectors, their code's behaviour, not a bidirectional prefix). "
                           "Default: the checkpoint's (official for weights.py --official models); recorded in the "
                           "checkpoints a run writes", TRAINED)
    ablate: str = flag("", "--eval_only: prefix (each sentence gets the previous sentence's embedding) or "
                           "source (the encoder sees only `<src_lang> </s>`)", (2,))
    given: tuple = dataclasses.field(default=())  # not a flag: the flags on the command line, filled by parse_args


FLAGS = [f for f in dataclasses.fields(Config) if "help" in f.metadata]


def stages_of(f):  # "stage 1 and 2": the stages a flag applies to, in messages and --help
    return "stage " + " and ".join(map(str, f.metadata["stages"]))


# The flags with a fixed set of values (argparse rejects the others), and the numbers that must be positive or
# non-negative (checked once the preset's defaults are in).
CHOICES = {"stage": (0, 1, 2), "preset": ("tiny", "paper"), "mapping": ("mlp", "hidden_mlp", "transformer"),
           "schedule": ("constant", "cosine"), "dtype": ("auto", "bf16", "fp16", "fp32"),
           "compile": ("auto", "none", "default", "reduce-overhead", "max-autotune"), "ablate": ("prefix", "source"),
           "prompt": tuple(PROMPTS), "task": ("caption", "text_recon", "translate", "triplet"),
           "test_prefix": ("image", "text")}
POSITIVE = ("batch_size", "grad_accum", "epochs", "lr", "save_every", "log_every", "beam", "max_new_tokens",
            "eval_batch_size")
NON_NEGATIVE = ("n_pairs", "max_steps", "max_eval", "warmup_steps", "eval_every", "weight_decay")
# The flags that leave --eval_only's hypotheses as they are: the others, given, name its file (score_checkpoint)
UNNAMED = ("stage", "task", "preset", "out", "eval_only", "test_split", "eval_batch_size", "features",
           "allow_large_images", "log_every")
RECIPES = {  # (preset, stage) -> (batch, epochs, lr)
    ("tiny", 0): (128, 4, 1e-3), ("tiny", 1): (64, 3, 5e-4), ("tiny", 2): (64, 2, 5e-4),
    # the official recipe: batch 32 x accumulation 4, 15 epochs, constant 1e-5
    ("paper", 1): (32, 15, 1e-5), ("paper", 2): (32, 15, 1e-5),
}




# -----------------------------------------------------------------------------
# The tasks: what stage 1 and stage 2 train on, the official code's --stage. A task is a row; the columns are
# the places where the tasks differ, (1) to (5), each read at one place in the code below.


@dataclass(frozen=True)
class Task:
    stage: int  # (1) the starting point: stage 1, the converted weights (tiny: stage 0's); 2, a stage 1 checkpoint
    prefix: str  # (2) what a frozen tower embeds for the prefix in training: "image", or "text": the input sentence
    test_prefix: str  # (2) ... when scoring (--test_prefix, or the image with --noise_test)
    pair: bool  # what an example is: a source and its translation, or one sentence (--caption_lang's), both input
    #             and target
    noised: bool  # (3) the encoder reads the input sentence with --mask_prob of its tokens dropped: always (1, the
    #               default: `<lang> </s>`, "the encoder input is trivial"), or with --noise_train / --noise_test only
    trains: str  # (4) besides the mapping network: "decoder" (mBART's encoder and shared embedding frozen) or "mbart"
    keeps: str  # (5) the checkpoint kept and tested: "last", or "best" (the best validation BLEU)


TASKS = {  # the official README's table, its columns the fields above
    "caption": Task(1, prefix="image", test_prefix="image", pair=False, noised=True, trains="decoder", keeps="last"),
    "text_recon": Task(1, prefix="text", test_prefix="text", pair=False, noised=True, trains="decoder", keeps="last"),
    "translate": Task(2, prefix="text", test_prefix="text", pair=True, noised=False, trains="mbart", keeps="best"),
    "triplet": Task(2, prefix="image", test_prefix="text", pair=True, noised=False, trains="mbart", keeps="best"),
}
DEFAULT_TASKS = {1: "caption", 2: "translate"}


def defaults(c: Config):
    """Fill what the command line left at 0 / empty from the preset and stage. Writes nothing (the default tiny
    world is made where the run starts)."""
    if "task" in c.given and "stage" not in c.given:  # `--task triplet` alone is stage 2
        c.stage = TASKS[c.task].stage
    c.task = c.task or DEFAULT_TASKS.get(c.stage, "")
    batch, epochs, lr = RECIPES.get((c.preset, c.stage), (0, 0, 0.0))
    c.batch_size, c.epochs, c.lr = c.batch_size or batch, c.epochs or epochs, c.lr or lr
    c.grad_accum = c.grad_accum or (4 if c.preset == "paper" else 1)
    c.data = c.data or (str(tiny_world.default_path()) if c.preset == "tiny" else "")
    has_english = "en" in (c.src.split("_")[0], c.tgt.split("_")[0])
    c.caption_lang = c.caption_lang or ("en" if has_english else "")  # the official choice
    c.test_split = c.test_split or ("test" if c.preset == "tiny" else "test_2016_flickr")
    c.out = c.out or f"runs/{c.preset}/stage{c.stage}"
    if not c.weights and c.preset == "tiny" and c.stage > 0:
        c.weights = str(Path(c.out).parent / "stage0" / "last")
    if c.stage == 2 and not c.init:
        c.init = str(Path(c.out).parent / "stage1" / "last")
    c.from_scratch_stage2 = c.from_scratch_stage2 or (c.stage == 2 and c.prefix_len == 0)  # (no stage 1 for it)
    return c


def check(c: Config):
    """Refuse, with a message, settings that cannot run as asked."""
    def refuse(text):
        raise SystemExit(f"error: {text}")
    given = c.given
    for f in FLAGS:
        if f.name in given and c.stage not in f.metadata["stages"]:
            refuse(f"--{f.name} has no effect in stage {c.stage}: it is for {stages_of(f)}; leave it out")
    if (c.preset, c.stage) not in RECIPES:
        refuse(f"stage {c.stage} exists for the tiny preset only (the paper's towers and mBART come "
               f"pretrained: convert them with weights.py)")
    for name in POSITIVE + NON_NEGATIVE:
        value, positive = getattr(c, name), name in POSITIVE
        if value < 0 or (value == 0 and positive):
            refuse(f"--{name} {value}: expected a {'positive' if positive else 'non-negative'} number")
    for name in ("src", "tgt", "caption_lang"):
        try:
            data.lang_code(getattr(c, name) or "en")
        except ValueError as e:
            refuse(f"--{name}: {e}")
    if c.prefix_len < -1:
        refuse(f"--prefix_len {c.prefix_len}: expected 0 or more (-1: the starting weights')")
    if not (c.dropout == -1 or 0 <= c.dropout < 1):
        refuse(f"--dropout {c.dropout}: expected a rate in [0, 1), or -1 to keep the model's")
    if c.preset == "paper" and not c.data:
        refuse("--data is required with --preset paper (a folder in the Multi30k layout: raw/{split}.{lang}[.gz] "
               "and image_splits/{split}.txt: python data.py multi30k --out DIR)")
    if c.ablate and not c.eval_only or c.checkpoint and not (c.eval_only or c.resume) or c.eval_only and c.resume:
        refuse("--ablate is for --eval_only, --checkpoint for --eval_only or --resume; --eval_only trains nothing "
               "to --resume")
    # (1) what a run starts from: --weights, --init, or (--resume, --eval_only) its own checkpoint
    from_weights = not (c.resume or c.eval_only) and (c.stage == 1 or c.from_scratch_stage2)
    started = from_weights or c.resume  # --resume: --weights and --init must be those the run started from
    if "weights" in given and not started or "init" in given and (from_weights or c.eval_only):
        refuse(f"--{'weights' if 'weights' in given else 'init'} has no effect here: stage 1 starts from --weights; "
               f"stage 2 from a stage 1 checkpoint (--init), or from --weights with --from_scratch_stage2 or "
               f"--prefix_len 0; --eval_only from OUT's checkpoint (or --checkpoint)")
    if from_weights and not c.weights:
        refuse("--weights is required with --preset paper (the converted weights: python weights.py --help)")
    if c.prefix_len == 0 and c.stage == 1:
        refuse("--prefix_len 0 with --stage 1: captioning needs the prefix (it is the image's only way into the "
               "decoder). The text-only baseline is a translation model: python train.py --stage 2 --prefix_len 0")
    if c.prefix_len == 0 and (c.test_prefix or c.ablate == "prefix"):
        refuse(f"--prefix_len 0 has no prefix to {'take away' if c.ablate else 'embed'}: drop "
               f"{'--ablate prefix' if c.ablate else '--test_prefix'}")
    check_task(c, refuse)
    if c.stage == 1 and not c.caption_lang:
        found = ", ".join(data.languages(c.data, c.train_split)) or "none found in --data"
        refuse(f"stage 1 captions in English when the pair has it, and {c.src}-{c.tgt} has no English (the "
               f"official code then captions in Spanish): give --caption_lang, one of the languages of the "
               f"training split ({found})")
    return c


def check_task(c: Config, refuse):
    """Refuse the task's flags where they mean nothing: a task of another stage, the noise without its switch,
    --unfreeze_clip without a text prefix to train, training switches in --eval_only."""
    task, given = TASKS.get(c.task), c.given
    if task and task.stage != c.stage:
        refuse(f"--task {c.task} is a stage {task.stage} task, not a stage {c.stage} one: give --stage {task.stage}, "
               f"or leave --stage out")
    if not 0 <= c.mask_prob <= 1:
        refuse(f"--mask_prob {c.mask_prob}: expected a share of the tokens, from 0 to 1")
    if c.stage == 2 and "mask_prob" in given and not (c.noise_train or c.noise_test):
        refuse("--mask_prob has an effect in stage 2 only with --noise_train or --noise_test: add one, or leave "
               "--mask_prob out")
    if c.unfreeze_clip and (c.task != "translate" or c.prefix_len == 0):
        refuse("--unfreeze_clip fine-tunes the text tower that makes the prefix in training: only the translate "
               "task has one (triplet's prefix comes from the image; --prefix_len 0 has none)")
    if c.prefix_len == 0 and c.task == "triplet":
        refuse("--prefix_len 0 with --task triplet: without a prefix the image has no way in (that is the "
               "text-only baseline: --task translate --prefix_len 0)")
    if c.use_all_langs and data.lang_code(c.src) == data.lang_code(c.tgt):
        refuse(f"--use_all_langs trains on each language of the pair, and --src {c.src} --tgt {c.tgt} is one "
               f"language: leave --use_all_langs out")
    trains = [f"--{k}" for k in ("use_all_langs", "noise_train", "unfreeze_clip") if getattr(c, k)]
    if c.eval_only and trains:
        refuse(f"{' '.join(trains)} change how a model trains: --eval_only trains nothing; leave them out")


def parser(suppress=False):
    """The command line of Config's flags; suppress: no defaults, so that parsing names the flags given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in FLAGS:
        text = f.metadata["help"]
        if "default" not in text and f.default not in ("", 0, False):  # (0, "": the text says what it means)
            text += f" (default: {f.default})"
        if f.metadata["stages"] != ALL:
            text += f" [{stages_of(f)}]"
        if f.metadata["kept"]:
            text += " (--resume keeps it)"
        default = argparse.SUPPRESS if suppress else f.default
        if f.type is bool or f.type == "bool":
            p.add_argument("--" + f.name, action="store_true", default=default, help=text)
        else:
            p.add_argument("--" + f.name, type=type(f.default), default=default, help=text,
                           choices=CHOICES.get(f.name))
    return p


def parse_args(argv=None):
    args = vars(parser().parse_args(argv))
    given = tuple(vars(parser(suppress=True).parse_args(argv)))  # on the command line, whatever the value
    return check(defaults(Config(**args, given=given)))


# -----------------------------------------------------------------------------
# (1) The starting point: converted weights (for the tiny preset, stage 0's), stage 1's checkpoint, or this
# run's own (--resume, --eval_only).


class Start(enum.Enum):  # what a run starts from, named as messages name it
    WEIGHTS = "starting weights"
    STAGE1 = "stage 1 checkpoint"
    CHECKPOINT = "checkpoint"


def starting_point(c: Config):
    """The folder the model comes from, and its kind (Start). Fails before any slow preparation."""
    out = Path(c.out)
    if c.resume or c.eval_only:
        kept = TASKS[c.task].keeps if c.eval_only else "last"  # --eval_only: (5) the checkpoint a run keeps
        # a crash between the two renames of a save left only the old copy: --resume puts it back first
        find = folders.find_checkpoint if c.eval_only else folders.recover_checkpoint
        start = find(c.checkpoint or out / kept)
        if not start.exists():
            raise SystemExit(f"error: no checkpoint in {start} to {'score' if c.eval_only else 'resume'}: "
                             f"train first (python train.py --stage {c.stage})")
        return start, Start.CHECKPOINT
    runs.check_free(out)  # (again once the run holds the folder: see Run)
    if c.stage == 2 and not c.from_scratch_stage2:
        if not folders.find_checkpoint(c.init).exists():
            raise SystemExit(f"error: stage 2 starts from a stage 1 checkpoint, and {c.init} does not exist. "
                             f"Run `python train.py --stage 1` first (or give --init), or pass "
                             f"--from_scratch_stage2 for the ablation without stage 1")
        return Path(c.init), Start.STAGE1
    start = Path(c.weights)
    if c.preset == "tiny" and not folders.find_checkpoint(start).exists() and start.name != "last":
        raise SystemExit(f"error: {start} does not exist: give --weights a stage 0 `last` folder "
                         f"(stage 0 writes OUT/last), or leave it out to use runs/tiny/stage0/last")
    return start, Start.WEIGHTS


def run_stage0(c: Config, env: Env):
    """Stage 0 (stage0.py) with the settings of `c`, a stage 0 Config, into its --out, in one process (the
    others wait): `python train.py --stage 0`, or the tiny preset's stage 1 when its starting weights are
    missing. It follows every run's rules: a folder of its own, free of an earlier run's files, held while it
    runs."""
    if env.rank == 0:
        runs.hold(c.out, new=True)
        names = [f.name for f in dataclasses.fields(stage0.Stage0Config)]
        settings = {k: getattr(c, k) for k in names if k not in ("mapping", "prefix_len")}
        if c.mapping:  # else Stage0Config's own (mlp, 10 prefix vectors), as weights.py writes them
            settings["mapping"] = c.mapping
        if c.prefix_len >= 0:
            settings["prefix_len"] = c.prefix_len
        stage0.stage0(stage0.Stage0Config(**settings), env.device)
        runs.release(c.out)
    if dist.is_initialized():
        dist.barrier()


def stage0_first(c: Config, start, kind: Start, env: Env):
    """The tiny preset's stage 1 starts from stage 0's `last`: when that is missing, stage 0 runs first, with
    its own defaults and this run's data, seed and mapping network."""
    if kind is Start.WEIGHTS and c.preset == "tiny" and not folders.find_checkpoint(start).exists():
        log0(env.rank, f"stage 0 output {start} is missing: running stage 0 first")
        run_stage0(defaults(Config(stage=0, data=c.data, seed=c.seed, mapping=c.mapping, out=str(start.parent))),
                   env)


def load_model(folder, c: Config, device, kind: Start):
    """The model of a checkpoint or weights folder of `kind`, checked against the preset and, for a stage 1
    checkpoint, its stage; a new mapping network where --mapping or --prefix_len asks for one; --dropout
    applied. Returns it and the folder it was found in."""
    folder = folders.find_checkpoint(folder)
    try:
        model = weights.load(folder, device=device)
        trained = weights.read_config(folder)[1].get("train", {})  # the settings a checkpoint was trained with
    except weights.ConversionError as e:
        raise SystemExit(f"error: {kind.value}: {e}")
    expected = CLIPTransConfig.preset(c.preset)
    for part in ("vision", "text", "mbart"):  # all from the preset but the vocabulary (the tokenizer's)
        a, b = dataclasses.asdict(getattr(expected, part)), dataclasses.asdict(getattr(model.config, part))
        diff = [k for k in a if k not in ("vocab_size", "dropout") and a[k] != b[k]]
        if diff:
            raise SystemExit(f"error: {kind.value} {folder} is not a {c.preset} model: its {part} differs in "
                             f"{diff} (found {[b[k] for k in diff]}, the {c.preset} preset has "
                             f"{[a[k] for k in diff]}). Use --preset to match it, or another checkpoint")
    if kind is Start.STAGE1 and trained.get("stage") != 1:
        raise SystemExit(f"error: {folder} is not a stage 1 checkpoint (its config.json says stage "
                         f"{trained.get('stage')}): give --init a stage 1 `last` folder")
    has = model.config.mapping
    wanted = MappingConfig(c.mapping or has.kind, has.prefix_len if c.prefix_len < 0 else c.prefix_len)
    if wanted != has:  # a new mapping network: only where one starts untrained anyway
        if kind is not Start.WEIGHTS:
            raise SystemExit(f"error: --mapping {wanted.kind} --prefix_len {wanted.prefix_len}: {kind.value} "
                             f"{folder} has a trained mapping network ({has.kind}, {has.prefix_len} prefix "
                             f"vectors). Leave --mapping and --prefix_len out, or start from --weights (stage 1, "
                             f"or stage 2 with --from_scratch_stage2)")
        model.new_mapping(wanted)
    try:  # the evaluation's search, checked before any step: its prompt is `</s> P1..Pp`
        decoding.check_search(model.config.mbart, 1 + model.config.mapping.prefix_len, c.beam, c.max_new_tokens)
    except ValueError as e:
        raise SystemExit(f"error: --beam {c.beam}, --max_new_tokens {c.max_new_tokens}: {e}")
    if model.config.mapping.prefix_len == 0 and (c.test_prefix or c.ablate == "prefix"):
        raise SystemExit(f"error: {folder} is the text-only baseline (no prefix): --test_prefix and "
                         f"--ablate prefix need a prefix")
    model.config.prompt = c.prompt or model.config.prompt  # how `score` generates; the checkpoints record it
    if c.dropout >= 0:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = c.dropout
            elif isinstance(m, Attention) and m.dropout:  # mBART's attention has none: keep it so
                m.dropout = c.dropout
    return model, folder


# -----------------------------------------------------------------------------
# Data: tokenised sentences, and the frozen towers' features, computed once and cached.


def read_tokenizer(kind, path):
    """A tokenizer of the starting folder (the tokenizers travel with every checkpoint), or a message."""
    try:
        return kind(path)
    except (OSError, ValueError) as e:  # missing, damaged, or of another layout
        raise SystemExit(f"error: {e}")


def features(model, c: Config, split: data.Split, kind, lang, folder, env: Env):
    """(N, D) frozen-tower embeddings of a split: its images, or its sentences in `lang`. Cached next to the
    data, keyed by the tower's weights and the preprocessing; rank 0 computes, the others wait and read."""
    if kind == "image":
        size = model.config.vision.image_size
        key = data.fingerprint(model.vision, "clip_preprocess", size, *data.image_digests(split.images))
        compute = lambda: data.embed_images(model.encode_image, split.images, size, 64,  # noqa: E731
                                            env.device)
    else:
        tok = read_tokenizer(data.TextTowerTokenizer, Path(folder) / weights.TEXT_TOKENIZER)
        sentences = split.sentences[lang]
        key = data.fingerprint(model.text, "text", *sentences)
        compute = lambda: data.embed_texts(model.encode_text, tok, sentences, 64, env.device,  # noqa: E731
                                           max_len=model.text.max_tokens)
    if env.rank != 0 and dist.is_initialized():  # rank 0 computes and caches them, the others wait and read
        dist.barrier()
    try:
        cache_dir = c.features or Path(c.data) / "features"
        name = f"{split.name}.{kind}" if kind == "image" or lang == c.src else f"{split.name}.{kind}.{lang}"
        feats = data.cached_embeddings(cache_dir, name, key, compute)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    if env.rank == 0 and dist.is_initialized():
        dist.barrier()
    return feats


@dataclass
class Examples:
    """A split, ready for the model."""
    sentences: dict  # language -> the split's sentences
    feats: torch.Tensor  # (N, D) the frozen tower's embedding of each example: the mapping network's input
    src_ids: list  # the encoder input of each example (token ids)
    tgt_ids: list  # the target of each example, `[lang] x </s>` (token ids)
    tgt_lang: str
    skipped: list  # the missing images whose examples were dropped (--skip_missing_images)
    text_rows: list = None  # --unfreeze_clip: the text tower's input `<s> x </s>` of each example, instead of feats
    noise: float = 0.0  # the training split's --mask_prob, drawn again every epoch (noised_for)


def prepare(c: Config, split, model, tok, folder, env: Env) -> Examples:
    """A split of --data read, embedded by its frozen tower and tokenised: what training and scoring read, as the
    task's row says: (2) the prefix's input, (3) the encoder's; the target."""
    task, scored = TASKS[c.task], split != c.train_split
    # (2) the prefix: the image, or the input sentence's text embedding (scored: --test_prefix, else the image
    # with --noise_test, else the task's test prefix)
    prefix = (c.test_prefix or ("image" if c.noise_test else task.test_prefix)) if scored else task.prefix
    image = prefix == "image"
    # what an example is: a source and its translation, or one sentence, both input and target (--use_all_langs:
    # the training split once per language of the pair)
    pairs = ([(c.src, c.tgt)] if task.pair else [(c.src, c.src), (c.tgt, c.tgt)] if c.use_all_langs and not scored
             else [(c.caption_lang, c.caption_lang)])
    images = (c.images or str(Path(c.data) / "images")) if image else None
    try:  # --n_pairs cuts the training split, --max_eval the others
        limit = c.n_pairs if split == c.train_split else c.max_eval
        s = data.read_split(c.data, split, list(dict.fromkeys(x for p in pairs for x in p)), images, limit=limit,
                            skip_missing_images=c.skip_missing_images)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    if s.skipped:
        log0(env.rank, f"{split}: {len(s.skipped)} example(s) dropped, their image missing "
                       f"(--skip_missing_images): {', '.join(s.skipped[:5])}{' ...' * (len(s.skipped) > 5)}")
    # (3) the encoder input: the input sentence, --mask_prob of its tokens dropped always (stage 1: "the encoder
    # input is trivial", `<lang> </s>`) or with --noise_train / --noise_test; drawn once for a scored split
    noise = c.mask_prob if task.noised or (c.noise_test if scored else c.noise_train) else 0.0
    # mBART's positions: the decoder reads `</s> P1..Pp <lang> y1..yn`, P + L positions for a target of L
    # tokens (`<lang> y1..yn </s>`); the encoder reads the source
    positions, P = model.config.mbart.max_positions, model.config.mapping.prefix_len
    parts = []
    for src_lang, tgt_lang in pairs:
        src = truncate(tok.rows(s.sentences[src_lang], src_lang), positions, "source", split, env.rank)
        tgt = truncate(tok.rows(s.sentences[tgt_lang], tgt_lang), positions - P, "target", split, env.rank)
        read = s  # what the text tower embeds: the input sentence; with --noise_test, as the encoder reads it
        if scored and noise:  # drawn once
            src = data.drop_tokens(src, noise, c.seed)
            if c.noise_test and not image:
                read = dataclasses.replace(s, name=f"{s.name}.mask{noise}", sentences={src_lang: tok.decode(src)})
        if P == 0:  # the text-only baseline: no prefix, so no M-CLIP embedding
            feats, text_rows = torch.zeros(len(s), 0), None
        elif c.unfreeze_clip and not image:  # the text tower trains: it embeds in every step
            feats = None
            text_rows = read_tokenizer(data.TextTowerTokenizer, Path(folder) / weights.TEXT_TOKENIZER).rows(
                read.sentences[src_lang], model.text.max_tokens)
        else:
            feats, text_rows = features(model, c, read, "image" if image else "text", src_lang, folder, env), None
        parts.append(Examples(s.sentences, feats, src, tgt, tgt_lang, s.skipped, text_rows,
                              0.0 if scored else noise))
    return parts[0] if len(parts) == 1 else joined(parts)


def joined(parts):
    """Examples one after the other (--use_all_langs: the training split in each language)."""
    first = parts[0]
    return dataclasses.replace(
        first, feats=None if first.feats is None else torch.cat([p.feats for p in parts]),
        src_ids=[r for p in parts for r in p.src_ids], tgt_ids=[r for p in parts for r in p.tgt_ids],
        text_rows=None if first.text_rows is None else [r for p in parts for r in p.text_rows])


def noised_for(ex: Examples, seed, epoch):
    """The training split as an epoch reads it: with --mask_prob of its encoder input's tokens dropped anew each
    epoch (the official code draws at every step), or as it is."""
    return dataclasses.replace(ex, src_ids=data.drop_tokens(ex.src_ids, ex.noise, seed * 1000 + epoch)) \
        if ex.noise else ex


def truncate(rows, limit, what, split, rank=0):
    """Token rows `[lang] x </s>` cut to `limit` tokens (keeping `</s>`), with a count: one over-long sentence
    must not stop a run at the step that meets it, nor its resume at the same step."""
    long = [i for i, row in enumerate(rows) if len(row) > limit]
    if long:
        log0(rank, f"{split}: {len(long)} {what} sentence(s) cut to mBART's {limit} tokens (line "
                   f"{', '.join(str(i + 1) for i in long[:5])}{' ...' if len(long) > 5 else ''})")
    return [row if len(row) <= limit else row[:limit - 1] + row[-1:] for row in rows]


# -----------------------------------------------------------------------------
# Evaluation: beam search, detokenised hypotheses against the raw references, sacrebleu's corpus BLEU.


@torch.no_grad()
def score(model, c: Config, ex: Examples, tok, env: Env, path):
    """The BLEU of `model` on a prepared split (rank 0's; None elsewhere), its hypotheses written to `path`:
    every rank generates for its share of the split, rank 0 gathers them in the split's order. --ablate takes
    one of the two inputs away."""
    import sacrebleu
    feats, src_ids = ablated(c.ablate, ex, tok)
    model.eval()
    sampler = data.LengthBucketSampler([len(s) for s in src_ids], c.eval_batch_size, shuffle=False,
                                       rank=env.rank, world_size=env.world)
    mine = {}
    for batch in tqdm(sampler, desc=f"eval {path.stem}", disable=env.rank != 0, leave=False):
        if not batch:
            continue
        ids, mask = data.pad([src_ids[i] for i in batch], tok.pad_id)  # (B, S)
        with env.autocast:
            clip = prefix_input(model, feats, ex.text_rows, batch, env.device)  # (B, D)
            out = model.generate(clip, ids.to(env.device), mask.to(env.device), tok.lang_id(ex.tgt_lang),
                                 num_beams=c.beam, max_new_tokens=c.max_new_tokens)
        mine.update(zip(batch, tok.decode(out.cpu())))
    if env.world > 1:
        parts = [None] * env.world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    model.train()
    if env.rank != 0:
        return None
    refs = ex.sentences[ex.tgt_lang]
    hyps = [mine[i] for i in range(len(refs))]  # every example exactly once, in the split's order
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(hyps) + "\n")
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def prefix_input(model, feats, text_rows, batch, device):
    """The mapping network's input (B, D) for the examples `batch`: their cached features, or (--unfreeze_clip)
    the text tower run on their sentences."""
    if text_rows is None:
        return feats[batch].to(device)
    ids, mask = data.pad([text_rows[i] for i in batch], model.config.text.pad_id)
    return model.encode_text(ids.to(device), mask.to(device))


def ablated(ablate, ex: Examples, tok):
    """A prepared split's inputs, the mapping network's (N, D) and the encoder's, with --ablate taking one away:
    "prefix", each sentence gets the previous sentence's embedding (what the source alone carries); "source",
    the encoder sees only `<src_lang> </s>` (what the prefix alone carries)."""
    if ablate == "prefix":
        return ex.feats.roll(1, dims=0), ex.src_ids
    if ablate == "source":
        return ex.feats, data.drop_tokens(ex.src_ids, 1.0)  # `[src_lang] </s>`: every word dropped
    return ex.feats, ex.src_ids


# -----------------------------------------------------------------------------
# Training: what trains, the schedule, the run's bookkeeping (checkpoints, metrics log, --resume), the loop.


def trainable(model, task: Task, freeze_decoder=False, unfreeze_clip=False):
    """(4) What trains: the mapping network in every task; in stage 1's the mBART decoder (the towers and the
    mBART encoder, with the shared embedding and the tied output layer, stay frozen; --freeze_decoder: the
    decoder too, as ClipCap's frozen-GPT-2 variant); in stage 2's all of mBART (--unfreeze_clip: and the text
    tower)."""
    model.requires_grad_(False)
    model.mapping.requires_grad_(True)
    if not freeze_decoder:
        (model.mbart.decoder if task.trains == "decoder" else model.mbart).requires_grad_(True)
    model.text.requires_grad_(unfreeze_clip)
    return [p for p in model.parameters() if p.requires_grad]


class EndToEnd(torch.nn.Module):
    """--unfreeze_clip: CLIPTrans with its text tower run inside the training step, from the source's tokens."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text_ids, text_mask, *inputs):  # (B, T) each, then CLIPTrans.forward's inputs
        return self.model(self.model.encode_text(text_ids, text_mask), *inputs)


def make_sampler(c: Config, train_set: Examples, env: Env):
    """Batches of examples of similar length, and the optimizer steps of an epoch. With several processes an
    epoch's short last step is dropped, so that no process gets an empty share."""
    sampler = data.LengthBucketSampler([len(t) for t in train_set.tgt_ids], c.batch_size, seed=c.seed,
                                       rank=env.rank, world_size=env.world, drop_last=env.world > 1)
    steps_per_epoch = len(sampler) // c.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set.tgt_ids)} training examples make no optimizer step of batch "
                         f"{c.batch_size} x grad_accum {c.grad_accum} x {env.world} process(es): lower "
                         f"--batch_size or --grad_accum")
    return sampler, steps_per_epoch


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


def resume_same(c: Config):
    """The settings --resume must continue with: the flags `kept`, but --weights and --init only when given (their
    defaults follow --out)."""
    return [f.name for f in FLAGS if f.metadata["kept"] and (f.name not in ("weights", "init") or f.name in c.given)]


def validate(c: Config, run: Run, val: Examples, tok):
    """Score the validation split (its hypotheses in OUT/hyps), log it, write `last` and, in stage 2, `best`."""
    t = time.time()
    bleu = score(run.model, c, val, tok, run.env, run.out / "hyps" / f"{c.val_split}.step{run.step}.txt")
    run.pause_s += time.time() - t
    if run.env.rank == 0:
        run.log(dict(step=run.step, epoch=run.epoch, split=c.val_split, bleu=round(bleu, 2)))
        log0(0, f"step {run.step}: {c.val_split} BLEU {bleu:.2f}")
    if run.env.world > 1:  # every process keeps the same checkpoints: rank 0's BLEU decides
        box = [bleu]
        dist.broadcast_object_list(box, src=0)
        bleu = box[0]
    if TASKS[c.task].keeps == "best" and bleu > run.best:  # (5) the best validation BLEU, or the last
        run.best = bleu
        run.save("best")
    run.save("last")


# -----------------------------------------------------------------------------
# One training step: forward, loss, backward, the optimizer, over grad_accum micro-batches. bench/bench.py
# times this very function.

PAD_MULTIPLE = 8  # a compiled step: lengths padded to multiples of 8, so an epoch has a few shapes, not hundreds


def pad_multiple(mode):
    """What micro_batch rounds lengths up to under --compile `mode` (resolved): PAD_MULTIPLE when compiled, 1
    (the longest row) when eager."""
    return 1 if mode == "none" else PAD_MULTIPLE


def micro_batch(ex: Examples, batch, pad_id, config, device, multiple=1):
    """Examples `batch` (indices) as the model's inputs on `device`: the mapping network's input (B, D)
    (--unfreeze_clip: the text tower's, (B, T) ids and mask), the encoder input and its mask (B, S), the targets
    (B, T). S and T are the longest row, rounded up to `multiple` for a compiled step (padding changes no loss:
    the pads are masked and labelled -100). Returns them and the batch's target tokens."""
    positions, P = config.mbart.max_positions, config.mapping.prefix_len
    ids, mask = data.pad([ex.src_ids[i] for i in batch], pad_id, multiple, limit=positions)
    tgt, _ = data.pad([ex.tgt_ids[i] for i in batch], pad_id, multiple, limit=positions - P)
    n_tok = sum(len(ex.tgt_ids[i]) for i in batch)
    prefix = (ex.feats[batch],) if ex.text_rows is None else data.pad([ex.text_rows[i] for i in batch],
                                                                       config.text.pad_id, multiple)
    return [t.to(device, non_blocking=True) for t in (*prefix, ids, mask, tgt)], n_tok


def batch_shapes(ex: Examples, batches, config, multiple=PAD_MULTIPLE):
    """The distinct input shapes (B, S, T) micro_batch gives `batches`: how many graphs a compiled step records."""
    positions, P = config.mbart.max_positions, config.mapping.prefix_len
    longest = lambda rows, batch: max(len(rows[i]) for i in batch)  # noqa: E731
    return {(len(b), data.padded_len(longest(ex.src_ids, b), multiple, positions),
             data.padded_len(longest(ex.tgt_ids, b), multiple, positions - P)) for b in batches}


def train_step(model, opt, scaler, micro, env: Env):
    """One optimizer step over the micro-batches `micro` ([(inputs, target tokens)], from micro_batch). The
    loss is the mean over all target tokens of the global batch: each process divides its sum by the global
    count, times world (DDP averages gradients), over the accumulated micro-batches. Returns that loss."""
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


def step_model(c: Config, run: Run, sampler, ex: Examples):
    """The model train_step runs (runs.compiled: DDP-wrapped, compiled on CUDA), and the multiple its batches'
    lengths are padded to: a compiled step pads to multiples of PAD_MULTIPLE, to compile a few shapes; an eager
    one to the longest row."""
    mode, shapes = compile_mode(c.compile, run.env), 0
    multiple = pad_multiple(mode)
    if mode != "none":
        sampler.set_epoch(run.epoch)
        shapes = len(batch_shapes(ex, list(sampler), run.model.config, multiple))
        log0(run.env.rank, f"an epoch pads its batches to {shapes} shapes (lengths in multiples of {multiple})")
    model = EndToEnd(run.model) if c.unfreeze_clip else run.model
    return compiled(model, mode, run.env, shapes=max(64, 2 * shapes)), multiple


def train(c: Config, run: Run, sampler, total, ex: Examples, val: Examples, tok):
    """Optimizer steps of grad_accum micro-batches until `total`, validating at the end of each epoch (or
    every --eval_every steps) and at the end. Returns the target tokens trained on (all processes) and the
    time it took."""
    env, model = run.env, run.model
    train_model, multiple = step_model(c, run, sampler, ex)
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
            loss_sum = train_step(train_model, run.opt, run.scaler, micro, env)
            run.step += 1
            run.batch_in_epoch += c.grad_accum
            n_tok = sum(n for _, n in micro)
            tok_window, tokens_seen = tok_window + n_tok, tokens_seen + n_tok
            bar.update(1)

            # timing and logging
            if run.step % c.log_every == 0 or run.step == 1 or run.step == total:
                dt = time.time() - t0 - (run.pause_s - pause_t0)
                tps = tok_window * env.world / max(dt, 1e-9)
                loss_value, lr = loss_sum.item(), lr_at(run.step - 1, c, total)
                if env.rank == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                    run.log(dict(step=run.step, epoch=run.epoch, loss=loss_value, lr=lr,
                                 tokens_per_s=round(tps)))
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
    elapsed = time.time() - t_start
    if env.world > 1:
        counted = torch.tensor(float(tokens_seen), device=env.device)
        dist.all_reduce(counted)
        tokens_seen = int(counted.item())
    return tokens_seen, elapsed


# -----------------------------------------------------------------------------
# Stages 1 and 2: the recipe.


def main(argv=None):
    # settings, where this process runs, the data (the default tiny world is made on first use, by rank 0)
    c = parse_args(argv)
    env = setup(c.device, c.dtype)
    if c.allow_large_images:
        data.allow_large_images()
    if Path(c.data) == tiny_world.default_path() and env.rank == 0:
        tiny_world.tiny_world()
    if c.stage == 0:  # the tiny preset's stand-ins for the pretrained models: stage0.py (rank 0 alone)
        run_stage0(c, env)
        return end(env)

    # (1) the starting point. The seed is set after the stage 0 this run may have had to run first: the run is
    # the same whether stage 0 was missing or not
    if dist.is_initialized():  # (the other processes wait for rank 0's tiny world)
        dist.barrier()
    start, kind = starting_point(c)
    stage0_first(c, start, kind, env)
    torch.manual_seed(c.seed + env.rank)
    random.seed(c.seed + env.rank)
    model, start = load_model(start, c, env.device, kind)
    tok = read_tokenizer(data.MBartTokenizer, start / weights.MBART_TOKENIZER)

    # the data, and the frozen towers' features: (2) the image or the source sentence; (3) the encoder input.
    # Every split the run scores is read and checked before the first step, not found broken after the last.
    if c.eval_only:
        return score_checkpoint(c, model, tok, start, env)
    train_set, val_set, test_set = (prepare(c, split, model, tok, start, env)
                                    for split in (c.train_split, c.val_split, c.test_split))

    # (4) what trains, with AdamW and (fp16) a gradient scaler, in batches of examples of similar length
    task = TASKS[c.task]
    params = trainable(model, task, c.freeze_decoder, c.unfreeze_clip)
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=c.weight_decay,
                            fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=env.dtype == "fp16")
    sampler, steps_per_epoch = make_sampler(c, train_set, env)
    total = c.max_steps or steps_per_epoch * c.epochs
    plan_disk(c.out, model, params, task.keeps == "best", c.ignore_disk_space, env.rank, c.unfreeze_clip)

    # the loop, from the start or (--resume) exactly where the checkpoint left off
    run = Run(dataclasses.asdict(c), resume_same(c), env, model, opt, scaler, start, resume=c.resume,
              share_towers=not c.unfreeze_clip)
    for name, ex in ((c.train_split, train_set), (c.val_split, val_set), (c.test_split, test_set)):
        if ex.skipped and not c.resume:
            run.log(dict(split=name, missing_images=len(ex.skipped), first_missing=ex.skipped[:5]))
    log0(env.rank, f"stage {c.stage} ({c.task}): "
                   f"{len(train_set.tgt_ids)} examples, {steps_per_epoch} steps per epoch, {total} steps, "
                   f"{env.world} process(es) on {env.device}, {env.dtype}; training "
                   f"{sum(p.numel() for p in params):,} parameters")
    tokens_seen, elapsed = train(c, run, sampler, total, train_set, val_set, tok)

    # the final test of (5) the kept checkpoint: `last` in stage 1, `best` in stage 2
    kept = run.out / task.keeps
    model = load_model(kept, c, env.device, Start.CHECKPOINT)[0] if task.keeps == "best" else model
    test_bleu = score(model, c, test_set, tok, env, run.out / "hyps" / f"{c.test_split}.final.txt")
    if env.rank == 0:  # (the BLEU is rank 0's)
        run.finish(dict(stage=c.stage, task=c.task, steps=run.step, minutes=round(elapsed / 60, 2),
                        tokens_per_s=round(tokens_seen / max(elapsed - run.pause_s, 1e-9)),
                        best_val_bleu=round(run.best, 2) if task.keeps == "best" else None, test_split=c.test_split,
                        test_bleu=round(test_bleu, 2), checkpoint=str(kept)))
    end(env)


def score_checkpoint(c: Config, model, tok, start, env: Env):
    """--eval_only: the BLEU of a checkpoint on --test_split (--ablate: with one of its two inputs taken away),
    its hypotheses in a file named by the settings given that change them: scoring again otherwise writes
    another file. A checkpoint of another stage gets a warning, one whose mapping network never trained an error,
    as in translate.py."""
    trained = weights.read_config(start)[1].get("train", {})
    try:
        weights.check_trained(start, trained, "captioning" if c.stage == 1 else "translation",
                              [c.caption_lang] if c.stage == 1 else [c.src, c.tgt])
    except weights.ConversionError as e:
        raise SystemExit(f"error: {e}")
    named = "".join(f".{k}" + ("" if v is True else "_" + re.sub(r"[^\w.-]+", "_", str(v)).strip("_"))
                    for k, v in dataclasses.asdict(c).items() if k in c.given and k not in UNNAMED)
    path = Path(c.out) / "hyps" / f"{c.test_split}.eval{named}.txt"
    bleu = score(model, c, prepare(c, c.test_split, model, tok, start, env), tok, env, path)
    if env.rank == 0:
        print(json.dumps({"split": c.test_split, "bleu": round(bleu, 2), "checkpoint": str(start),
                          "hypotheses": str(path), **({"ablate": c.ablate} if c.ablate else {})}))
    end(env)


def end(env: Env):
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
