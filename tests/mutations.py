"""Plant known bugs one at a time and see whether the tests catch them (run on demand; pytest does not collect
this file: its name does not start with test_).

    python tests/mutations.py               # every mutation
    python tests/mutations.py prefix_scaled # those whose name contains any of the words given
    python tests/mutations.py --list

Each mutation is a text replacement in one file of a temporary copy of the working tree (tracked and untracked
files, not the ignored ones), which must match exactly once; then the tests named for it run there (pytest, one
intra-op thread) and the mutation is `caught` when they fail, `MISSED` when they pass. The working tree itself is
never touched. The tests also run once on the unchanged copy first (`baseline`), so that a failure is known to
come from the mutation."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = Path(os.environ.get("MULTI30K_DIR", ROOT.parent / "shared" / "multi30k"))


@dataclass
class Mutation:
    name: str
    path: str  # relative to the repository
    old: str
    new: str
    tests: list  # pytest node ids or files, relative to the repository
    what: str = ""


AGREEMENT = "tests/test_agreement.py"
RECIPE = "tests/test_recipe.py"
OFFICIAL = "tests/test_official.py"
TRAIN = "tests/test_train.py"

MUTATIONS = [
    Mutation("prefix_scaled_in_training_only", "cliptrans.py",
             "prefix = self.mapping(clip_embeds).to(tokens.dtype)  # (B, P, d)",
             "prefix = self.mapping(clip_embeds).to(tokens.dtype) * 1.01  # (B, P, d)",
             [f"{AGREEMENT}::test_training_forward_equals_cached_decoding"],
             "the prefix 1% larger in CLIPTrans.decoder_inputs (training) than in generate"),
    Mutation("forward_causal_mask", "cliptrans.py",
             "h = self.mbart.decoder(embeds, memory, attention_mask, mask=mask)",
             "h = self.mbart.decoder(embeds, memory, attention_mask, mask=None)",
             [f"{AGREEMENT}::test_training_forward_equals_cached_decoding"],
             "CLIPTrans.forward with a causal mask instead of the prefix mask (forward alone)"),
    Mutation("generate_prompt_without_prefix_mask", "cliptrans.py",
             "        mask = make_mask(P, 1 + P, embeds.device)\n",
             "        mask = None\n",
             [f"{AGREEMENT}::test_training_forward_equals_cached_decoding"],
             "generation reads its prompt causally (training: the prefix bidirectional)"),
    Mutation("beam_length_penalty_off_by_one", "decoding.py",
             "new = cand_scores / ((step + 1) ** length_penalty)",
             "new = cand_scores / (step ** length_penalty if step else 1.0)",
             [f"{AGREEMENT}::test_beam_search_equals_a_direct_beam_search"],
             "beam search's length penalty counts one token fewer"),
    Mutation("beam_finished_from_all_candidates", "decoding.py",
             "just_ended = ended & top_nb[None, :]",
             "just_ended = ended",
             [f"{AGREEMENT}::test_beam_search_equals_a_direct_beam_search"],
             "finished hypotheses taken from all 2 nb candidates, not the top nb"),
    Mutation("beam_never_as_false", "decoding.py",
             'n = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else step + 1',
             "n = step + 1",
             [f"{AGREEMENT}::test_beam_search_equals_a_direct_beam_search"],
             'early_stopping="never" bounds the running beams as early_stopping=False does'),
    Mutation("greedy_min_new_tokens_one_more", "decoding.py",
             "            if step < min_new_tokens:\n",
             "            if step <= min_new_tokens:\n",
             [f"{AGREEMENT}::test_search_edges_equal_hf"],
             "greedy bans </s> one step longer than min_new_tokens"),
    Mutation("greedy_min_new_tokens_one_fewer", "decoding.py",
             "            if step < min_new_tokens:\n",
             "            if step < min_new_tokens - 1:\n",
             [f"{AGREEMENT}::test_search_edges_equal_hf"],
             "greedy bans </s> one step shorter than min_new_tokens"),
    Mutation("beam_min_new_tokens_one_more", "decoding.py",
             "eos_id if step < min_new_tokens else None",
             "eos_id if step <= min_new_tokens else None",
             [f"{AGREEMENT}::test_search_edges_equal_hf", f"{AGREEMENT}::test_beam_search_equals_a_direct_beam_search"],
             "beam search bans </s> one step longer than min_new_tokens"),
    Mutation("no_forced_eos_when_min_reaches_max", "decoding.py",
             "    if forced_eos:\n",
             "    if forced_eos and min_new_tokens < max_new_tokens:\n",
             [f"{AGREEMENT}::test_search_edges_equal_hf"],
             "no forced </s> at the last step when min_new_tokens >= max_new_tokens"),
    Mutation("mapping_relu_for_prelu", "cliptrans.py",
             "self.net = nn.Sequential(nn.Linear(clip_dim, P * d_model), nn.PReLU())",
             "self.net = nn.Sequential(nn.Linear(clip_dim, P * d_model), nn.ReLU())",
             [f"{AGREEMENT}::test_mapping_network_equals_the_official_modules"],
             "the mlp mapping network with ReLU instead of PReLU"),
    Mutation("hidden_mlp_gelu", "cliptrans.py",
             "nn.Sequential(nn.Linear(clip_dim, d_model), nn.ReLU(),",
             "nn.Sequential(nn.Linear(clip_dim, d_model), nn.GELU(),",
             [f"{AGREEMENT}::test_mapping_network_equals_the_official_modules"],
             "the hidden_mlp mapping network with GELU for its hidden ReLU"),
    Mutation("mapping_transformer_gelu", "cliptrans.py",
             'self.block = Block(d_model, 2, d_model // 3, "relu",',
             'self.block = Block(d_model, 2, d_model // 3, "gelu",',
             [f"{AGREEMENT}::test_mapping_network_equals_the_official_modules"],
             "the transformer mapping network's feed-forward with GELU"),
    Mutation("mapping_transformer_pre_norm", "cliptrans.py",
             'self.block = Block(d_model, 2, d_model // 3, "relu", pre_norm=False,',
             'self.block = Block(d_model, 2, d_model // 3, "relu", pre_norm=True,',
             [f"{AGREEMENT}::test_mapping_network_equals_the_official_modules"],
             "the transformer mapping network pre-LN instead of post-LN"),
    Mutation("official_columns_follow_the_prefix", "cliptrans.py",
             "(i[None, :] >= 1) & (i[None, :] <= 10))",
             "(i[None, :] >= 1) & (i[None, :] <= prefix_len))",
             [f"{OFFICIAL}::test_official_prompt_logits_equal_theirs",
              f"{OFFICIAL}::test_official_decoding_equals_theirs"],
             "the official mask's columns 1..P instead of their hard-coded 1..10"),
    Mutation("official_prompt_in_training_order", "cliptrans.py",
             '"official": (lambda eos, prefix: torch.cat([prefix, eos], dim=1)',
             '"official": (lambda eos, prefix: torch.cat([eos, prefix], dim=1)',
             [f"{OFFICIAL}::test_official_decoding_equals_theirs"],
             "the official prompt as `</s> P1..Pp`, the training order"),
    Mutation("official_ddp_prefix_kept", "official.py",
             'key = re.sub(r"(^|\\.)module\\.", r"\\1", key)',
             "key = key",
             [f"{OFFICIAL}::test_every_layout_of_their_files_converts_to_the_same_model"],
             "the official files' `module.` (DDP) left in the keys"),
    Mutation("bench_hf_causal_mask", "bench/bench.py",
             'def first_loss_agreement(ours, mbart_hf, mapping_hf, clip, src, src_mask, tgt, hf_mask="prefix"):',
             'def first_loss_agreement(ours, mbart_hf, mapping_hf, clip, src, src_mask, tgt, hf_mask="causal"):',
             ["tests/test_bench.py::test_first_loss_agreement_tells_the_prefix_mask_from_a_causal_one"],
             "bench.py gives Hugging Face's decoder its own causal mask"),
    Mutation("infill_ratio", "stage0.py",
             "def infill(ids, mask_id, g, ratio=0.35):",
             "def infill(ids, mask_id, g, ratio=0.25):",
             [f"{RECIPE}::test_infill_equals_a_reference_and_masks_spans"],
             "stage 0's text infilling masks 25% of the words"),
    Mutation("infill_longer_spans", "stage0.py",
             "span = min(n_mask, 1 + int(torch.randint(3, (1,), generator=g)))",
             "span = min(n_mask, 1 + int(torch.randint(4, (1,), generator=g)))",
             [f"{RECIPE}::test_infill_equals_a_reference_and_masks_spans"],
             "stage 0's spans of up to 4 words"),
    Mutation("stage0_one_sided_infonce", "stage0.py",
             "loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2",
             "loss = F.cross_entropy(logits, target)",
             [f"{RECIPE}::test_stage0_contrastive_loss_is_symmetric_infonce"],
             "stage 0's contrastive loss from image to text only"),
    Mutation("stage0_no_temperature", "stage0.py",
             "logits = img @ txt.T * temp.exp().clamp(max=100)",
             "logits = img @ txt.T",
             [f"{RECIPE}::test_stage0_contrastive_loss_is_symmetric_infonce"],
             "stage 0's similarities without CLIP's temperature"),
    Mutation("dropout_after_the_residual", "cliptrans.py",
             "            return x + self.drop(f(ln(x)))\n",
             "            return self.drop(x + f(ln(x)))\n",
             [f"{RECIPE}::test_training_mode_equals_hf_with_the_same_dropout_masks"],
             "mBART's dropout on the residual sum instead of the sub-layer's output"),
    Mutation("embedding_dropout_before_layernorm", "cliptrans.py",
             "return self.drop(self.ln_embed(x + positions))",
             "return self.ln_embed(self.drop(x + positions))",
             [f"{RECIPE}::test_training_mode_equals_hf_with_the_same_dropout_masks"],
             "mBART's embedding dropout before the LayerNorm"),
    Mutation("clip_preprocess_bilinear", "data.py",
             "image = image.resize((w, h), resample=Image.BICUBIC)",
             "image = image.resize((w, h), resample=Image.BILINEAR)",
             [f"{RECIPE}::test_text_and_image_files_to_the_towers_equal_hf"],
             "CLIP preprocessing resizes bilinearly"),
    Mutation("text_tower_mean_over_padding", "cliptrans.py",
             "pooled = (x * m).sum(1) / m.sum(1)",
             "pooled = x.mean(1)",
             [f"{RECIPE}::test_text_and_image_files_to_the_towers_equal_hf"],
             "M-CLIP's pooling averages the padding too"),
    Mutation("warmup_off_by_one", "train.py",
             "        return c.lr * (step + 1) / c.warmup_steps\n",
             "        return c.lr * step / c.warmup_steps\n",
             [f"{RECIPE}::test_learning_rate_schedule"],
             "the cosine schedule's warmup one step late"),
    Mutation("cosine_to_total_without_warmup", "train.py",
             "(step - c.warmup_steps) / max(1, total - c.warmup_steps)",
             "(step - c.warmup_steps) / max(1, total)",
             [f"{RECIPE}::test_learning_rate_schedule"],
             "the cosine decay does not reach 0 at the last step"),
    # What no test said before (round 4): the properties a user relies on in the official code's switches.
    Mutation("drop_tokens_keeps_the_share", "data.py",
             "keep = torch.rand(len(row), generator=g) > p",
             "keep = torch.rand(len(row), generator=g) < p",
             [f"{TRAIN}::test_drop_tokens_drops_the_share_asked_at_an_uneven_rate"],
             "--mask_prob keeps the share it should drop (alike at 0.5)"),
    Mutation("noise_train_one_draw", "train.py",
             "noised_for(ex, c.seed, run.epoch)",
             "noised_for(ex, c.seed, 0)",
             [f"{TRAIN}::test_noise_train_draws_new_masks_every_epoch_in_the_loop"],
             "--noise_train draws the same masks every epoch in the training loop"),
    Mutation("noise_switches_together", "train.py",
             "(c.noise_test if scored else c.noise_train)",
             "(c.noise_test or c.noise_train)",
             [f"{TRAIN}::test_each_noise_switch_alone_leaves_the_other_side_whole"],
             "--noise_train also masks the scored sources, --noise_test the training ones"),
    Mutation("use_all_langs_from_caption_lang", "train.py",
             "[(c.src, c.src), (c.tgt, c.tgt)]",
             "[(c.caption_lang, c.caption_lang), (c.tgt, c.tgt)]",
             [f"{TRAIN}::test_use_all_langs_with_the_target_as_caption_language_trains_on_both"],
             "--use_all_langs trains on --caption_lang and the target (twice the target when they are one)"),
    Mutation("unfreeze_clip_scores_cached_features", "train.py",
             "        elif c.unfreeze_clip:  # the text tower trains",
             "        elif c.unfreeze_clip and not scored:  # the text tower trains",
             [f"{TRAIN}::test_unfreeze_clip_scores_with_the_text_tower_as_trained"],
             "--unfreeze_clip scores with features cached before the text tower trained"),
    Mutation("official_caption_lang_from_the_source", "official.py",
             'train["caption_lang"] = "en" if "en_XX" in langs else "es"',
             'train["caption_lang"] = "en" if langs[0] == "en_XX" else "es"',
             [f"{OFFICIAL}::test_a_stage1_model_of_a_pair_into_english_captions_in_english"],
             "a converted stage 1 model of de -> en captions in Spanish"),
    Mutation("resume_lets_noise_train_through", "settings.py",
             '"none of their words)", (2,), kept=True)',
             '"none of their words)", (2,))',
             [f"{TRAIN}::test_resume_refuses_every_flag_that_changes_training[noise_train]"],
             "--resume accepts another --noise_train"),
    Mutation("cut_row_loses_its_end", "data.py",
             "row[:limit - 1] + row[-1:]",
             "row[:limit]",
             [f"{TRAIN}::test_a_row_cut_to_fit_still_ends_in_its_end_token"],
             "a row cut to mBART's positions loses its </s>"),
    Mutation("scaler_not_saved", "runs.py",
             '"scaler": self.scaler.state_dict(),',
             '"scaler": {},',
             [f"{RECIPE}::test_grad_scaler_state_survives_a_resume"],
             "the run's checkpoint without the gradient scaler's state"),
]


def copy_tree(dst):
    """The working tree as it is (tracked and untracked files, not the ignored ones) into dst."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def run_tests(repo, tests):
    env = dict(os.environ, OMP_NUM_THREADS="1", MULTI30K_DIR=str(MULTI30K), PYTHONDONTWRITEBYTECODE="1")
    t = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=repo,
                          env=env, capture_output=True, text=True)
    return done.returncode, time.time() - t, done.stdout + done.stderr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="run the mutations whose name contains one of these words")
    p.add_argument("--list", action="store_true")
    p.add_argument("--no_baseline", action="store_true", help="skip the run on the unchanged copy")
    p.add_argument("-v", "--verbose", action="store_true", help="print the end of pytest's output")
    a = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not a.names or any(n in m.name for n in a.names)]
    if a.list:
        for m in chosen:
            print(f"{m.name:40s} {m.path:16s} {m.what}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        repo = Path(tmp) / "repo"
        copy_tree(repo)
        if not a.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            code, secs, log = run_tests(repo, tests)
            print(f"baseline ({len(tests)} test targets): {'pass' if code == 0 else 'FAIL'} in {secs:.0f} s",
                  flush=True)
            if code != 0:
                print(log[-4000:])
                return 1
        for m in chosen:
            path = repo / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name}: the text to replace occurs {original.count(m.old)} times in {m.path}: stale "
                      f"mutation", flush=True)
                results.append((m, "stale"))
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                code, secs, log = run_tests(repo, m.tests)
            finally:
                path.write_text(original)
            verdict = "caught" if code == 1 else "MISSED" if code == 0 else f"error (pytest exit {code})"
            results.append((m, verdict))
            print(f"{m.name:40s} {verdict:8s} {secs:5.0f} s  {m.what}", flush=True)
            if a.verbose or code not in (0, 1):
                print("\n".join(log.splitlines()[-15:]))
    missed = [m.name for m, v in results if v != "caught"]
    print(f"\n{len(results) - len(missed)} of {len(results)} caught" + (f"; not caught: {', '.join(missed)}"
                                                                          if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
