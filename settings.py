"""
The settings of a training run, as nanoGPT's configurator.py keeps them apart from its train.py: one table of flags
(`Config`), the presets' recipes, the defaults each stage and preset fill in, and every refusal: a flag given is
honoured or refused in one line, never ignored or overridden. `c = settings.parse_args()` returns settings that run.
"""

import argparse
import dataclasses
from pathlib import Path

import data
import tiny_world
from cliptrans import MAPPINGS, PROMPTS

ALL, TRAINED = (0, 1, 2), (1, 2)  # every stage; the stages that train CLIPTrans (stage 0 makes its stand-ins)


def flag(default, text, stages=ALL, kept=False):
    """A setting: its --help text, the stages it applies to, and whether --resume must keep it (`kept`: it changes
    what the run learns: the data, its order, the model, the optimizer)."""
    return dataclasses.field(default=default, metadata={"help": text, "stages": stages, "kept": kept})


@dataclasses.dataclass
class Config:
    stage: int = flag(1, "0: tiny stand-ins for the pretrained models; 1: captioning; 2: translation", kept=True)
    task: str = flag("", "what the stage trains on, a row of train.TASKS (the official code's --stage): caption or "
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
    caption_lang: str = flag("", "stage 1's caption language (default, as the official code: English when --src "
                                 "or --tgt is English; for a pair without English it must be given)", (1,), kept=True)
    train_split: str = flag("train", "the split to train on", kept=True)
    val_split: str = flag("val", "the split to validate on (stage 2 keeps the checkpoint best on it; stage 0 "
                                 "measures the towers' retrieval on it)")
    test_split: str = flag("", "the split scored at the end of training, or by --eval_only (tiny world: test; "
                               "Multi30k: test_2016_flickr)", TRAINED)
    n_pairs: int = flag(0, "use only the first n training examples (0: all); the low-resource experiment", kept=True)
    mapping: str = flag("", "a new mapping network of this kind where one starts untrained (default: the "
                            "starting weights'; stage 0: mlp)", kept=True)
    prefix_len: int = flag(-1, "a new mapping network with this many prefix vectors (-1: the starting weights'; "
                               "stage 0: 10); 0: no prefix, the text-only mBART baseline (stage 2 only)", kept=True)
    batch_size: int = flag(0, "examples per micro-batch, per process (default: the preset's, for the stage)", kept=True)
    grad_accum: int = flag(0, "micro-batches per optimizer step; the loss is divided accordingly (default: paper 4, "
                              "tiny 1)", TRAINED, kept=True)
    epochs: int = flag(0, "passes over the training split (default: the preset's, for the stage)")
    max_steps: int = flag(0, "stop after this many optimizer steps (0: run all epochs)", TRAINED)
    lr: float = flag(0.0, "AdamW's learning rate (default: the preset's, for the stage)", kept=True)
    schedule: str = flag("constant", "constant (the paper), or cosine (linear warmup, cosine decay to 0)", TRAINED,
                         kept=True)
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
    dtype: str = flag("auto", "auto: bf16 on GPUs that have it, else fp16 + GradScaler; fp32 on CPU", TRAINED)
    compile: str = flag("auto", "torch.compile's mode for the training step: auto (one GPU: reduce-overhead, the "
                                "fastest bench.py measured; several (DDP): default; CPU: none), none (eager), "
                                "default, reduce-overhead (CUDA graphs), max-autotune", TRAINED)
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    skip_missing_images: bool = flag(False, "drop the examples whose image file is missing, as the official WIT "
                                            "loader does (default: a missing image is an error)", TRAINED, kept=True)
    ignore_disk_space: bool = flag(False, "start even when --out's disk looks too small for the checkpoints", TRAINED)
    allow_large_images: bool = flag(False, "lift pillow's limit on image pixels (a decompression-bomb guard)")
    langs: str = flag("", "the languages stage 0's stand-ins learn (default: all the tiny world's, "
                          f"{' '.join(tiny_world.LANGS)}; leave one out: a language the towers and mBART never saw)",
                      (0,))
    out: str = flag("", "the run's folder (default: runs/PRESET/stageSTAGE)")
    checkpoint: str = flag("", "--eval_only / --resume: the checkpoint (default: OUT/best or OUT/last)", TRAINED)
    resume: bool = flag(False, "continue the run in OUT exactly where its `last` checkpoint left off", TRAINED)
    eval_only: bool = flag(False, "score a checkpoint on --test_split instead of training", TRAINED)
    from_scratch_stage2: bool = flag(False, "the ablation: stage 2 without stage 1, from --weights", (2,), kept=True)
    freeze_decoder: bool = flag(False, "the ablation: stage 1 trains the mapping network alone, mBART frozen", (1,),
                                kept=True)
    test_prefix: str = flag("", "what the prefix is made from when stage 2 scores: image, or text, the source as "
                                "the encoder reads it (with --noise_test, its tokens dropped) (default: the task's, "
                                "the source; with --noise_test, the image, as the official code)", (2,))
    use_all_langs: bool = flag(False, "stage 1 trains on the sentences of both languages of the pair, not of "
                                      "--caption_lang alone: its training split once per language, as the official "
                                      "--use_all_langs (validation and test stay in --caption_lang)", (1,), kept=True)
    mask_prob: float = flag(1.0, "the share of the encoder input's tokens dropped, its language code and </s> kept "
                                 "(the official --mask_prob): in stage 1 always (1: `<lang> </s>`, the trivial "
                                 "input), in stage 2 with --noise_train or --noise_test", TRAINED, kept=True)
    noise_train: bool = flag(False, "stage 2 trains on sources with --mask_prob of their tokens dropped, drawn again "
                                    "every epoch (with the default --mask_prob 1, as the official code's: "
                                    "none of their words)", (2,), kept=True)
    noise_test: bool = flag(False, "stage 2 scores sources with --mask_prob of their tokens dropped, and the prefix "
                                   "from the image (the official --noise_test; --mask_prob 0: --test_prefix image)",
                            (2,))
    unfreeze_clip: bool = flag(False, "the translate task fine-tunes M-CLIP's text tower with the rest: the prefix is "
                                      "embedded in every step, never cached, and every checkpoint holds its own "
                                      "towers", (2,), kept=True)
    prompt: str = flag("", "the decoder's prompt when generating: train (`</s> P1..Pp`, the layout training uses) or "
                           "official (the official code's at test time: `P1..Pp </s>` under its patched mask, which "
                           "shows columns 1 to 10 to every row after the first whatever --prefix_len). Default: the "
                           "checkpoint's (official for official.py's models); recorded in the checkpoints a run "
                           "writes", TRAINED)
    ablate: str = flag("", "--eval_only: prefix (each sentence gets the previous sentence's embedding) or source "
                           "(the encoder sees only `<src_lang> </s>`)", (2,))
    given: tuple = dataclasses.field(default=())  # not a flag: the flags on the command line, filled by parse_args


FLAGS = [f for f in dataclasses.fields(Config) if "help" in f.metadata]
TASKS = {1: ("caption", "text_recon"), 2: ("translate", "triplet")}  # the tasks of each stage, its default first
# The flags with a fixed set of values (argparse rejects the others), and the ranges of the numbers.
CHOICES = {"stage": ALL, "preset": ("tiny", "paper"), "mapping": MAPPINGS, "schedule": ("constant", "cosine"),
           "dtype": ("auto", "bf16", "fp16", "fp32"),
           "compile": ("auto", "none", "default", "reduce-overhead", "max-autotune"), "ablate": ("prefix", "source"),
           "prompt": tuple(PROMPTS), "task": sum(TASKS.values(), ()), "test_prefix": ("image", "text")}
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "a positive number"), (lambda v: v >= 0, "a non-negative number")
RANGES = {  # flag -> (its values, in words), checked once the preset's defaults are in
    **dict.fromkeys(("batch_size", "grad_accum", "epochs", "lr", "save_every", "log_every", "beam", "max_new_tokens",
                     "eval_batch_size"), POSITIVE),
    **dict.fromkeys(("n_pairs", "max_steps", "max_eval", "warmup_steps", "eval_every", "weight_decay"), NON_NEGATIVE),
    "prefix_len": (lambda v: v >= -1, "0 or more (-1: the starting weights')"),
    "dropout": (lambda v: v == -1 or 0 <= v < 1, "a rate in [0, 1), or -1 to keep the model's"),
    "mask_prob": (lambda v: 0 <= v <= 1, "a share of the tokens, from 0 to 1"),
}
# The flags that leave --eval_only's hypotheses as they are: the others, given, name its file (scored_as)
UNNAMED = ("stage", "task", "preset", "out", "eval_only", "test_split", "eval_batch_size", "features",
           "allow_large_images", "log_every")
RECIPES = {  # (preset, stage) -> (batch, epochs, lr)
    ("tiny", 0): (128, 4, 1e-3), ("tiny", 1): (64, 3, 5e-4), ("tiny", 2): (64, 2, 5e-4),
    ("paper", 1): (32, 15, 1e-5), ("paper", 2): (32, 15, 1e-5),  # the official recipe: batch 32 x accumulation 4
}


def stages_of(f):  # "stage 1 and 2": the stages a flag applies to, in messages and --help
    return "stage " + " and ".join(map(str, f.metadata["stages"]))


def parser(description, suppress=False):
    """The command line of Config's flags; suppress: no defaults, so that parsing names the flags given."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in FLAGS:
        text = f.metadata["help"]
        if "default" not in text and f.default not in ("", 0, False):  # (0, "": the text says what it means)
            text += f" (default: {f.default})"
        text += f" [{stages_of(f)}]" * (f.metadata["stages"] != ALL) + " (--resume keeps it)" * f.metadata["kept"]
        kind = (dict(action="store_true") if f.type is bool or f.type == "bool" else
                dict(type=type(f.default), choices=CHOICES.get(f.name)))
        p.add_argument("--" + f.name, default=argparse.SUPPRESS if suppress else f.default, help=text, **kind)
    return p


def parse_args(argv=None, description=None) -> Config:
    """The command line's settings, their defaults filled in, checked. description: --help's (train.py's docstring)."""
    args = vars(parser(description).parse_args(argv))
    given = tuple(vars(parser(description, suppress=True).parse_args(argv)))  # on the command line, whatever value
    return check(defaults(Config(**args, given=given)))


def defaults(c: Config):
    """What the command line left at 0 or empty, from the preset and stage (writing nothing: no tiny world yet)."""
    if "task" in c.given and "stage" not in c.given:  # `--task triplet` alone is stage 2
        c.stage = next(stage for stage, tasks in TASKS.items() if c.task in tasks)
    c.task = c.task or TASKS.get(c.stage, ("",))[0]
    batch, epochs, lr = RECIPES.get((c.preset, c.stage), (0, 0, 0.0))
    c.batch_size, c.epochs, c.lr = c.batch_size or batch, c.epochs or epochs, c.lr or lr
    c.grad_accum = c.grad_accum or (4 if c.preset == "paper" else 1)
    c.data = c.data or (str(tiny_world.default_path()) if c.preset == "tiny" else "")
    c.caption_lang = c.caption_lang or ("en" if "en" in (c.src.split("_")[0], c.tgt.split("_")[0]) else "")
    c.test_split = c.test_split or ("test" if c.preset == "tiny" else "test_2016_flickr")
    c.out = c.out or f"runs/{c.preset}/stage{c.stage}"
    if not c.weights and c.preset == "tiny" and c.stage > 0:
        c.weights = str(Path(c.out).parent / "stage0" / "last")
    if c.stage == 2 and not c.init:
        c.init = str(Path(c.out).parent / "stage1" / "last")
    c.from_scratch_stage2 = c.from_scratch_stage2 or (c.stage == 2 and c.prefix_len == 0)  # (no stage 1 for it)
    return c


def check(c: Config):
    """Refuse settings that cannot run as asked: a flag of another stage, a number out of range, a wrong start."""
    def refuse(text):
        raise SystemExit(f"error: {text}")
    for f in FLAGS:
        if f.name in c.given and c.stage not in f.metadata["stages"]:
            refuse(f"--{f.name} has no effect in stage {c.stage}: it is for {stages_of(f)}; leave it out")
    if (c.preset, c.stage) not in RECIPES:
        refuse(f"stage {c.stage} exists for the tiny preset only (the paper's towers and mBART come "
               f"pretrained: convert them with weights.py)")
    for name, (ok, values) in RANGES.items():
        if not ok(getattr(c, name)):
            refuse(f"--{name} {getattr(c, name)}: expected {values}")
    for name in ("src", "tgt", "caption_lang"):
        try:
            data.lang_code(getattr(c, name) or "en")
        except ValueError as e:
            refuse(f"--{name}: {e}")
    if c.preset == "paper" and not c.data:
        refuse("--data is required with --preset paper: a folder in the Multi30k layout, raw/{split}.{lang}[.gz] and "
               "image_splits/{split}.txt (git clone https://github.com/multi30k/dataset: dataset/data/task1)")
    if c.ablate and not c.eval_only or c.checkpoint and not (c.eval_only or c.resume) or c.eval_only and c.resume:
        refuse("--ablate is for --eval_only, --checkpoint for --eval_only or --resume; --eval_only trains nothing "
               "to --resume")
    from_weights = not (c.resume or c.eval_only) and (c.stage == 1 or c.from_scratch_stage2)  # (1) from --weights
    started = from_weights or c.resume  # --resume: --weights and --init must be those the run started from
    if "weights" in c.given and not started or "init" in c.given and (from_weights or c.eval_only):
        refuse(f"--{'weights' if 'weights' in c.given else 'init'} has no effect here: stage 1 starts from "
               f"--weights; stage 2 from a stage 1 checkpoint (--init), or from --weights with --from_scratch_stage2 "
               f"or --prefix_len 0; --eval_only from OUT's checkpoint (or --checkpoint)")
    if from_weights and not c.weights:
        refuse("--weights is required with --preset paper (the converted weights: python weights.py --help)")
    if c.stage == 1 and not c.caption_lang:
        found = ", ".join(data.languages(c.data, c.train_split)) or "none found in --data"
        refuse(f"stage 1 captions in English when the pair has it, and {c.src}-{c.tgt} has no English (the "
               f"official code then captions in Spanish): give --caption_lang, one of the languages of the "
               f"training split ({found})")
    check_task(c, refuse)
    return c


def check_task(c: Config, refuse):
    """Refuse the task's flags where they mean nothing: a task of another stage, the noise without its switch, no
    text prefix for --unfreeze_clip to train, training switches in --eval_only, no prefix for a task that needs one."""
    if c.stage in TASKS and c.task not in TASKS[c.stage]:
        refuse(f"--task {c.task} is a stage {3 - c.stage} task, not a stage {c.stage} one: give --stage "
               f"{3 - c.stage}, or leave --stage out")
    if c.stage == 2 and "mask_prob" in c.given and not (c.noise_train or c.noise_test):
        refuse("--mask_prob has an effect in stage 2 only with --noise_train or --noise_test: add one, or leave "
               "--mask_prob out")
    if c.unfreeze_clip and (c.task != "translate" or c.prefix_len == 0):
        refuse("--unfreeze_clip fine-tunes the text tower that makes the prefix in training: only the translate "
               "task has one (triplet's prefix comes from the image; --prefix_len 0 has none)")
    if c.prefix_len == 0 and c.task != "translate":
        refuse(f"--prefix_len 0 with --task {c.task}: the task learns through the prefix, its input's only way into "
               f"the decoder. The text-only baseline is a translation model: python train.py --stage 2 --prefix_len 0")
    if c.use_all_langs and data.lang_code(c.src) == data.lang_code(c.tgt):
        refuse(f"--use_all_langs trains on each language of the pair, and --src {c.src} --tgt {c.tgt} is one "
               f"language: leave --use_all_langs out")
    trains = [f"--{k}" for k in ("use_all_langs", "noise_train", "unfreeze_clip") if getattr(c, k)]
    if c.eval_only and trains:
        refuse(f"{' '.join(trains)} change how a model trains: --eval_only trains nothing; leave them out")


# -----------------------------------------------------------------------------
# What other parts of a run read from the settings.


def for_stage0(c: Config, out) -> Config:
    """The stage 0 that the tiny preset's stage 1 runs first, its weights missing: this run's data, seed, mapping."""
    return defaults(Config(stage=0, data=c.data, seed=c.seed, mapping=c.mapping, out=str(out)))


def resume_same(c: Config):
    """The settings --resume must keep: the flags `kept`, --weights and --init only when given (else from --out)."""
    return [f.name for f in FLAGS if f.metadata["kept"] and (f.name not in ("weights", "init") or f.name in c.given)]


def scored_as(c: Config):
    """`.flag_value...`: --eval_only's hypotheses' file named by the flags given that change it (all but UNNAMED)."""
    names = [(f.name, getattr(c, f.name)) for f in FLAGS if f.name in c.given and f.name not in UNNAMED]
    return "".join(f".{k}" + ("" if v is True else "_" + "".join(ch if ch.isalnum() or ch in ".-" else "_"
                                                                 for ch in str(v)).strip("_")) for k, v in names)
