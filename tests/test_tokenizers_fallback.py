"""weights.py's tokenizer step, offline, on the layouts of the real hub repositories.

1. No tokenizer.json: facebook/mbart-large-50 and xlm-roberta-large ship their sentencepiece model
   (`sentencepiece.bpe.model`), and a folder may hold only that. weights.py then converts it. Here unigram
   sentencepiece models are trained on Multi30k, laid out as in those repositories, converted, read back with
   data.py's tokenizers and compared with the slow tokenizers on real Multi30k sentences in en/de/fr/cs.
   transformers 5 has no slow tokenizers any more (MBart50Tokenizer and XLMRobertaTokenizer are built on
   `tokenizers`, and AutoTokenizer ignores use_fast=False), so the reference is what the slow ones computed:
   sentencepiece's own ids, moved into fairseq's dictionary (`fairseq_ids`), with `[lang] x </s>` (mBART-50)
   or `<s> x </s>` (XLM-R) around them. That reference was checked equal to the slow MBart50Tokenizer and
   XLMRobertaTokenizer of transformers 4.46 on these sentences.
2. The vocabulary check: a tokenizer that does not fit the model (another size, no mBART-50 language codes)
   fails the conversion with a message that says what was expected, what was found and what to do.
"""

import json
import shutil
import sys

import pytest
import sentencepiece  # a test dependency (requirements.txt): trains the models and is the reference
import torch

import data
import hub
import weights
from conftest import MBART_LARGE_50, XLM_ROBERTA_LARGE
from test_data import LANGS, gz_lines, tokenizer_sentences

# Strings that sentencepiece's normalisation changes: runs of spaces, spaces at either end, non-breaking and
# full-width characters, a ligature, characters the model has never seen (which become <unk>).
ODD = ["  Two  dogs   run. ", " A cat.", "A\xa0dog\xa0", "ＦＵＬＬ width ①", "ﬁne", "Ⅻ", "中文 字符", "Привет",
       "e\u0301", "tab\there", ""]

# facebook/mbart-large-50's tokenizer files besides the model (as on the hub, minus its local paths)
MASK = {"content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": True}
MBART_TOKENIZER_CONFIG = {
    "src_lang": None, "tgt_lang": None, "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
    "cls_token": "<s>", "pad_token": "<pad>", "mask_token": {**MASK, "__type": "AddedToken"},
    "language_codes": "ML50", "sp_model_kwargs": {}, "tokenizer_file": None, "additional_special_tokens": None,
    "special_tokens_map_file": None, "tokenizer_class": "MBart50Tokenizer"}
MBART_SPECIAL_TOKENS_MAP = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>",
    "cls_token": "<s>", "mask_token": MASK, "additional_special_tokens": data.MBART50_LANGS}


def train_sentencepiece(folder, model_type):
    """A sentencepiece model trained on 2000 Multi30k lines of each language, as the real ones are: sentencepiece's
    defaults (nmt_nfkc normalisation, character coverage 0.9995, so rare characters become <unk>)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "train.txt"
    lines = [line for lang in LANGS for line in gz_lines("train", lang)[:2000]]
    text.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / model_type), vocab_size=1000,
                                             model_type=model_type, minloglevel=2)
    return folder / f"{model_type}.model"


@pytest.fixture(scope="session")
def unigram_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"), "unigram")


def hub_folder(folder, spm_model, kind):
    """A model folder laid out like facebook/mbart-large-50 ("mbart") or xlm-roberta-large ("xlmr") for its
    tokenizer, without tokenizer.json: config.json (the real one, with this vocabulary's size),
    sentencepiece.bpe.model, and for mBART-50 tokenizer_config.json and special_tokens_map.json."""
    folder.mkdir(parents=True)
    shutil.copy(spm_model, folder / hub.SENTENCEPIECE_MODEL)
    n = sentencepiece.SentencePieceProcessor(model_file=str(spm_model)).get_piece_size()
    if kind == "mbart":
        config = {**MBART_LARGE_50, "vocab_size": n + 1 + 52 + 1}  # fairseq's <pad>, the codes, <mask>
        (folder / "tokenizer_config.json").write_text(json.dumps(MBART_TOKENIZER_CONFIG))
        (folder / "special_tokens_map.json").write_text(json.dumps(MBART_SPECIAL_TOKENS_MAP))
    else:
        config = {**XLM_ROBERTA_LARGE, "vocab_size": n + 1 + 1}  # fairseq's <pad>, <mask>
    (folder / "config.json").write_text(json.dumps(config))
    return folder, config


def convert(folder, kind, config, out):
    """The converter's tokenizer step, written where data.py's tokenizers read it."""
    out.write_bytes(hub.tokenizer_json(folder, kind, config, f"{folder}/config.json"))
    return out


def fairseq_ids(sp, text):
    """The slow tokenizers' ids of `text`, special tokens left out: sentencepiece's pieces in fairseq's
    dictionary, where <s> <pad> </s> <unk> come first and every other piece moves up one (sentencepiece's
    <unk> <s> </s> are its 0 1 2); an unknown piece is <unk> (3)."""
    return [i + 1 if i != sp.unk_id() else 3 for i in sp.encode(text)]


def padded(rows, pad_id=1):
    """(B, T) right-padded ids and the mask, as data.py's encode returns them."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    return ids, mask


def assert_same_as_sentencepiece(ours, sp, sents, ids):
    """Decoding gives sentencepiece's normalised text back, for every sentence without unknown pieces."""
    known = [b for b, s in enumerate(sents) if sp.unk_id() not in sp.encode(s)]
    assert len(known) > 0.8 * len(sents)
    assert [ours.decode(ids[b:b + 1])[0] for b in known] == [sp.decode(sp.encode(sents[b])) for b in known]


# ----------------------------------------------------------------------------- 1. the sentencepiece fallback


@pytest.mark.parametrize("src,tgt", [("en", "de"), ("de", "fr"), ("fr", "cs"), ("cs", "en")])
def test_mbart50_sentencepiece_folder_gives_the_slow_tokenizers_ids(tmp_path, unigram_model, src, tgt):
    folder, config = hub_folder(tmp_path / "mbart-large-50", unigram_model, "mbart")
    ours = data.MBartTokenizer(convert(folder, "mbart", config, tmp_path / "tokenizer_mbart.json"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(unigram_model))
    n = sp.get_piece_size()
    # fairseq's layout: 4 specials, pieces 4..n, then the 52 codes, then <mask>: as many ids as the model
    assert ours.vocab_size == config["vocab_size"] == n + 54
    assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.tok.token_to_id("<unk>")) == (0, 1, 2, 3)
    assert [ours.lang_id(c) for c in data.MBART50_LANGS] == list(range(n + 1, n + 53))  # slow: sp size + 1 + index
    assert ours.tok.token_to_id("<mask>") == n + 53

    for lang, mode in ((src, "source"), (tgt, "target")):  # MBart50Tokenizer(src_lang=src, tgt_lang=tgt)
        sents = tokenizer_sentences()[lang] + ODD
        code = ours.lang_id(lang)
        ref = padded([[code] + fairseq_ids(sp, s) + [2] for s in sents])
        ids, mask = ours.encode(sents, lang)  # (mBART-50 writes a target as it writes a source)
        assert torch.equal(ids, ref[0]) and torch.equal(mask, ref[1]), f"{lang} ({mode})"
        assert ids[:, 0].eq(code).all() and ids.gather(1, mask.sum(1, keepdim=True) - 1).eq(2).all()
        assert_same_as_sentencepiece(ours, sp, sents, ids)


def test_xlmr_sentencepiece_folder_gives_the_slow_tokenizers_ids(tmp_path, unigram_model):
    folder, config = hub_folder(tmp_path / "xlm-roberta-large", unigram_model, "xlmr")
    ours = data.TextTowerTokenizer(convert(folder, "text", config, tmp_path / "tokenizer_text.json"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(unigram_model))
    n = sp.get_piece_size()
    assert ours.vocab_size == config["vocab_size"] == n + 2  # no language codes: <mask> right after the pieces
    assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.tok.token_to_id("<mask>")) == (0, 1, 2, n + 1)
    assert all(ours.tok.token_to_id(c) is None for c in data.MBART50_LANGS)
    for lang in LANGS:
        sents = tokenizer_sentences()[lang] + ODD
        ids, mask = ours.encode(sents)
        ref = padded([[0] + fairseq_ids(sp, s) + [2] for s in sents])
        assert torch.equal(ids, ref[0]) and torch.equal(mask, ref[1]), lang
        assert_same_as_sentencepiece(ours, sp, sents, ids)


def test_sentencepiece_model_is_read_as_sentencepiece_reads_it(unigram_model):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(unigram_model))
    pieces, trainer, norm = hub.read_sentencepiece(unigram_model)
    assert [p for p, _, _ in pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [s for _, s, _ in pieces] == [sp.get_score(i) for i in range(sp.get_piece_size())]  # float32, exactly
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 1 for i in range(sp.get_piece_size())]
    assert [t for _, _, t in pieces] == kinds
    assert trainer["model_type"] == 1 and len(norm["precompiled_charsmap"]) > 0  # unigram, nmt_nfkc's table


def test_conversion_needs_neither_sentencepiece_nor_protobuf(tmp_path, unigram_model, monkeypatch):
    """The converter reads the model file itself: sentencepiece's generated protobuf code refuses a protobuf
    older than the one it was generated with, so depending on it would break conversions on many machines."""
    folder, config = hub_folder(tmp_path / "mbart", unigram_model, "mbart")
    expected = hub.tokenizer_json(folder, "mbart", config, "config.json")
    for name in ("sentencepiece", "google.protobuf", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    assert hub.tokenizer_json(folder, "mbart", config, "config.json") == expected


def test_bpe_sentencepiece_model_is_refused(tmp_path):
    """mBART-50's and XLM-R's sentencepiece models are unigram models; a BPE one segments text differently,
    so converting it as unigram (what transformers 5 does) would silently give other ids."""
    bpe = train_sentencepiece(tmp_path / "spm", "bpe")
    folder, config = hub_folder(tmp_path / "mbart", bpe, "mbart")
    with pytest.raises(weights.ConversionError, match=r"is not a sentencepiece model like facebook/mbart-large-50's, "
                                                      r"which has the unigram algorithm \(not BPE, word or char\)\. "
                                                      r"Put the tokenizer files of facebook/mbart-large-50"):
        hub.tokenizer_json(folder, "mbart", config, "config.json")


def test_missing_or_damaged_tokenizer_files_fail_clearly(tmp_path, unigram_model):
    folder, config = hub_folder(tmp_path / "xlmr", unigram_model, "xlmr")
    (folder / hub.SENTENCEPIECE_MODEL).unlink()
    with pytest.raises(weights.ConversionError, match=r"has no XLM-R \(M-CLIP's text tower\) tokenizer: expected "
                                                      r"tokenizer.json or sentencepiece.bpe.model, as in the hub "
                                                      r"repository xlm-roberta-large: download them into it"):
        hub.tokenizer_json(folder, "text", config, "config.json")
    data_bytes = unigram_model.read_bytes()
    (folder / hub.SENTENCEPIECE_MODEL).write_bytes(data_bytes[:len(data_bytes) // 2])
    with pytest.raises(weights.ConversionError, match="cannot read .*sentencepiece.bpe.model .*damaged or not a "
                                                      "sentencepiece model; download it again"):
        hub.tokenizer_json(folder, "text", config, "config.json")
    (folder / hub.SENTENCEPIECE_MODEL).unlink()
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(weights.ConversionError, match="cannot read .*tokenizer.json .*download it again"):
        hub.tokenizer_json(folder, "text", config, "config.json")


# ----------------------------------------------------------------------------- 2. the vocabulary check


def test_sentencepiece_model_of_another_size_fails(tmp_path, unigram_model):
    """A folder whose sentencepiece model is not the one of the weights beside it (here: 1054 ids against
    mbart-large-50's 250054)."""
    folder, _ = hub_folder(tmp_path / "mbart", unigram_model, "mbart")
    with pytest.raises(weights.ConversionError) as e:
        hub.tokenizer_json(folder, "mbart", MBART_LARGE_50, f"{folder}/config.json")
    message = str(e.value)
    assert f"{folder / hub.SENTENCEPIECE_MODEL} has 1054 ids but the mBART-50 model has 250054 " \
           f"(vocab_size in {folder}/config.json)" in message
    assert f"Put the tokenizer files of the repository the weights come from (facebook/mbart-large-50) in " \
           f"{folder}" in message


@pytest.mark.parametrize("case", ["xlmr_tokenizer_for_mbart", "mbart_tokenizer_for_xlmr", "no_language_codes"])
def test_tokenizer_that_does_not_fit_its_model_fails_conversion(tmp_path, case, hf_mbart_dir, hf_xlmr_dir,
                                                                hf_mclip_dir, hf_clip_dir, tiny_tokenizer_json,
                                                                tiny_xlmr_tokenizer_json):
    mbart, xlmr = hf_mbart_dir, hf_xlmr_dir
    if case == "xlmr_tokenizer_for_mbart":  # the tokenizer of another model in the mBART folder
        mbart = shutil.copytree(hf_mbart_dir, tmp_path / "mbart")
        shutil.copy(tiny_xlmr_tokenizer_json, mbart / "tokenizer.json")
        expected = [f"{mbart / 'tokenizer.json'} has 250002 ids but the mBART-50 model has 250054 "
                    f"(vocab_size in {mbart}/config.json)", "(facebook/mbart-large-50) in"]
    elif case == "mbart_tokenizer_for_xlmr":
        xlmr = shutil.copytree(hf_xlmr_dir, tmp_path / "xlmr")
        shutil.copy(tiny_tokenizer_json, xlmr / "tokenizer.json")
        expected = [f"{xlmr / 'tokenizer.json'} has 250054 ids but the XLM-R (M-CLIP's text tower) model has "
                    f"250002 (vocab_size in {xlmr}/config.json)", "(xlm-roberta-large) in"]
    else:  # the right size, but one language code renamed: not mBART-50's layout
        mbart = shutil.copytree(hf_mbart_dir, tmp_path / "mbart")
        text = (mbart / "tokenizer.json").read_text(encoding="utf-8")
        (mbart / "tokenizer.json").write_text(text.replace('"af_ZA"', '"af_XX"'), encoding="utf-8")
        expected = ["has no language codes ['af_ZA'] (1 of mBART-50's 52 missing): it is not an mBART-50 tokenizer"]
    out = tmp_path / "out"
    with pytest.raises(weights.ConversionError) as e:
        weights.convert_all(mbart, hf_mclip_dir, xlmr, hf_clip_dir, out)
    for part in expected:
        assert part in str(e.value), str(e.value)
    assert not out.exists() or not any(out.iterdir()), "nothing written"


def test_fixture_tokenizers_have_the_real_sizes(tiny_tokenizer_json, tiny_xlmr_tokenizer_json):
    """The tiny checkpoints' tokenizers are padded to the real vocabularies (the converter checks the sizes)
    with pieces no text matches: real sentences get the trained pieces' ids, language codes sit where
    mbart-large-50 has them."""
    mbart, xlmr = data.MBartTokenizer(tiny_tokenizer_json), data.TextTowerTokenizer(tiny_xlmr_tokenizer_json)
    assert (mbart.vocab_size, xlmr.vocab_size) == (MBART_LARGE_50["vocab_size"], XLM_ROBERTA_LARGE["vocab_size"])
    assert mbart.lang_id("ar") == 250001 and mbart.lang_id("sl") == 250052 and mbart.tok.token_to_id("<mask>") == 250053
    assert xlmr.tok.token_to_id("<mask>") == 250001
    sents = gz_lines("val", "de")[:200] + gz_lines("val", "cs")[:200]
    ids, mask = mbart.encode(sents, "de")
    used = [mbart.tok.id_to_token(i) for i in ids[mask.bool()].unique().tolist()]
    assert not any("\ue000" <= c <= "\uf8ff" for piece in used for c in piece), "a padding piece matched real text"
    assert torch.equal(xlmr.encode(sents)[0][:, 1:], ids[:, 1:])  # the same pieces in both layouts
