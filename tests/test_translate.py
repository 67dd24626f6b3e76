"""translate.py with bad input: checkpoints that were not trained for what they are asked, input that is not
UTF-8, starts with a byte-order mark or is too long for mBART. (Its output against `train.py --eval_only`
is in test_train.py.)

The checkpoints are a random tiny model, written here in a second: no training. What it writes means nothing;
the tests look at what translate.py reads, refuses and warns of."""

import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

import data
import tiny_world
import translate
import weights
from cliptrans import CLIPTrans, CLIPTransConfig
from conftest import ROOT

TRAINED = {"stage": 2, "src": "en", "tgt": "de", "caption_lang": "en"}  # config.json's "train", in part
FAST = ["--beam", "1", "--max_new_tokens", "8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small tiny world: its tokenizer and a few 32-pixel images."""
    return tiny_world.make_tiny_world(tmp_path_factory.mktemp("world"), n_train=32, n_val=2, n_test=2,
                                      image_size=32)


@pytest.fixture(scope="module")
def stage2(world, tmp_path_factory):
    """A random tiny CLIPTrans, in a checkpoint folder as stage 2 (en -> de) writes one."""
    cfg = CLIPTransConfig.preset("tiny")
    cfg.mbart.vocab_size = cfg.text.vocab_size = data.MBartTokenizer(world / "tokenizer.json").vocab_size
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("stage2") / "best"
    files = {name: world / "tokenizer.json" for name in (weights.MBART_TOKENIZER, weights.TEXT_TOKENIZER)}
    weights.save(CLIPTrans(cfg), folder, {"train": TRAINED}, files=files, state={"step": 0})
    return folder


def checkpoint(stage2, folder, train):
    """A copy of the stage 2 checkpoint whose config.json's "train" section is `train` (None: no section, as
    in the weights weights.py converts)."""
    shutil.copytree(stage2, folder)
    config = json.loads((folder / weights.CONFIG_FILE).read_text())
    del config["train"]
    if train is not None:
        config["train"] = train
    (folder / weights.CONFIG_FILE).write_text(json.dumps(config))
    return folder


def run(capsys, monkeypatch, *cli, stdin=b""):
    """translate.main in this process, `stdin` (bytes) as its standard input: (stdout lines, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    capsys.readouterr()
    translate.main([str(c) for c in cli])
    out, err = capsys.readouterr()
    return out.splitlines(), err


def image(world):
    return world / "images" / "val_00000.png"


# ----------------------------------------------------------------------------- what it was trained for


@pytest.mark.parametrize("train, what", [
    ({**TRAINED, "stage": 0}, "a stage 0 checkpoint"),
    (None, "converted weights (its config.json has no 'train' section)"),
])
@pytest.mark.parametrize("task", [["A small red circle."], ["--image", "IMAGE"]])
def test_refuses_a_checkpoint_whose_mapping_network_never_trained(train, what, task, world, stage2, tmp_path):
    folder = checkpoint(stage2, tmp_path / "ckpt", train)
    task = [image(world) if t == "IMAGE" else t for t in task]
    with pytest.raises(SystemExit) as e:
        translate.main([str(c) for c in ["--checkpoint", folder, *FAST, *task]])
    assert str(e.value.code).startswith(f"error: {folder} is {what}: its mapping network was never trained")
    assert f"expected a stage 1 or stage 2 checkpoint: train stage 1 from it (python train.py --stage 1 " \
           f"--weights {folder}" in str(e.value.code)


@pytest.mark.parametrize("cli, warning", [
    (["--tgt", "fr", "A small red circle."], "not translation, en -> fr"),
    (["--src", "fr", "Un petit cercle rouge."], "not translation, fr -> de"),
    (["--image", "IMAGE"], "not captioning in en"),
])
def test_warns_when_asked_for_what_the_checkpoint_was_not_trained_for(cli, warning, world, stage2, capsys,
                                                                      monkeypatch):
    lines, err = run(capsys, monkeypatch, "--checkpoint", stage2, *FAST,
                     *[image(world) if c == "IMAGE" else c for c in cli])
    trained = f"warning: {stage2} was trained for stage 2 (translation, en -> de), "
    assert len(lines) == 1 and trained + warning in err, err
    assert "ask it in the languages it was trained on" in err or "captions come from a stage 1 checkpoint" in err


def test_warns_when_a_stage1_checkpoint_translates_or_captions_in_another_language(world, stage2, tmp_path,
                                                                                 capsys, monkeypatch):
    stage1 = checkpoint(stage2, tmp_path / "stage1", {**TRAINED, "stage": 1})
    _, err = run(capsys, monkeypatch, "--checkpoint", stage1, *FAST, "A small red circle.")
    assert f"warning: {stage1} was trained for stage 1 (captioning in en), not translation, en -> de" in err
    _, err = run(capsys, monkeypatch, "--checkpoint", stage1, *FAST, "--tgt", "de", "--image", image(world))
    assert f"warning: {stage1} was trained for stage 1 (captioning in en), not captioning in de" in err
    # what it was trained for, under the language's short or full name: no warning
    for cli in (["--image", image(world)], ["--tgt", "en_XX", "--image", image(world)]):
        lines, err = run(capsys, monkeypatch, "--checkpoint", stage1, *FAST, *cli)
        assert len(lines) == 1 and err == ""
    lines, err = run(capsys, monkeypatch, "--checkpoint", stage2, *FAST, "--src", "en_XX", "--tgt", "de_DE",
                     "A small red circle.")
    assert len(lines) == 1 and err == ""


# ----------------------------------------------------------------------------- the input


def test_a_byte_order_mark_on_stdin_is_not_part_of_the_first_line(stage2, capsys, monkeypatch):
    seen = []
    real = translate.translate

    def spy(model, mbart_tok, text_tok, sentences, *rest):
        seen.append(sentences)
        return real(model, mbart_tok, text_tok, sentences, *rest)
    monkeypatch.setattr(translate, "translate", spy)
    text = b"A small red circle.\r\nA large blue star.\n"
    for stdin in (text, b"\xef\xbb\xbf" + text):  # without and with the UTF-8 byte-order mark
        lines, _ = run(capsys, monkeypatch, "--checkpoint", stage2, *FAST, stdin=stdin)
        assert len(lines) == 2
    assert seen == [["A small red circle.", "A large blue star."]] * 2


def test_an_over_long_line_is_named_before_any_is_translated(stage2, capsys, monkeypatch):
    """mBART's encoder has 128 positions in the tiny preset: `<en_XX> x </s>` may hold 126 tokens of text."""
    tok = data.MBartTokenizer(stage2 / weights.MBART_TOKENIZER)
    longest, too_long = " ".join(["circle"] * 126), " ".join(["circle"] * 127)
    assert tok.encode([longest, too_long], "en")[1].sum(1).tolist() == [128, 129]
    lines, _ = run(capsys, monkeypatch, "--checkpoint", stage2, *FAST, stdin=f"A dog.\n{longest}\n".encode())
    assert len(lines) == 2
    stdin = f"A dog.\n{too_long}\nA cat.\n{too_long} circle\n".encode()
    with pytest.raises(SystemExit) as e:
        run(capsys, monkeypatch, "--checkpoint", stage2, *FAST, stdin=stdin)
    assert str(e.value.code) == ("error: expected at most 128 tokens a sentence (mBART's encoder has 128 "
                                 "positions; its language code and </s> count), found line 2 (129 tokens), "
                                 "line 4 (130 tokens): split them into shorter sentences (nothing was "
                                 "translated)")
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match="found sentence 1 \\(129 tokens\\)"):
        run(capsys, monkeypatch, "--checkpoint", stage2, *FAST, too_long, "A dog.")


LATIN1 = [b"A dog.", b"Un chien \xe9tait l\xe0.", b"A cat."]  # sentence 2 is not UTF-8 but Latin-1
NOT_UTF8 = ("{} 2 is not valid UTF-8 (at character 10): expected UTF-8 text; convert it (e.g. iconv -f "
            "latin1 -t utf-8) or set the terminal to UTF-8")


def test_stdin_that_is_not_utf8_is_named(stage2, capsys, monkeypatch):
    """Python's stdin gave UnicodeDecodeError's message, without the line (UTF-8 locale), or handed the bytes
    on as lone surrogates (POSIX locale), which the tokenizer rejected with a TypeError."""
    with pytest.raises(SystemExit) as e:
        run(capsys, monkeypatch, "--checkpoint", stage2, *FAST, stdin=b"".join(s + b"\n" for s in LATIN1))
    assert str(e.value.code) == "error: " + NOT_UTF8.format("line")


def test_arguments_that_are_not_utf8_are_named(stage2):
    """Python decodes argv with surrogateescape: the tokenizer rejected the lone surrogates with a TypeError.
    In a real process, as a shell would start it."""
    proc = subprocess.run([sys.executable, "translate.py", "--checkpoint", str(stage2), *FAST, *LATIN1],
                          cwd=ROOT, capture_output=True, timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1 and proc.stdout == b"", err
    assert err == f"error: {NOT_UTF8.format('sentence')}\n", err
