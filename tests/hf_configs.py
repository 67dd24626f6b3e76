"""The real checkpoints' configs, written out by hand (no hub access in tests), for parameter-count checks.

Each dict is the architecture part of the hub repo's config.json: facebook/mbart-large-50,
xlm-roberta-large, openai/clip-vit-base-patch32 and M-CLIP/XLM-Roberta-Large-Vit-B-32.
`hf_param_counts()` builds the Hugging Face models from them on the meta device (no memory, ~1 s)."""

import torch

# facebook/mbart-large-50 config.json (generation settings like num_beams=5, max_length=200 live in its
# generation config and are left out here: transformers 5 warns about them in a model config).
MBART_LARGE_50 = {
    "model_type": "mbart",
    "architectures": ["MBartForConditionalGeneration"],
    "vocab_size": 250054,  # 4 fairseq specials + 249997 pieces + 52 language codes + <mask>
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "max_position_embeddings": 1024,  # the learned table has 1024 + 2 rows
    "activation_function": "gelu",  # exact erf GELU
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "init_std": 0.02,
    "scale_embedding": True,  # embeddings x sqrt(1024) = x32
    "add_final_layer_norm": True,
    "normalize_before": True,
    "normalize_embedding": True,
    "static_position_embeddings": False,
    "add_bias_logits": False,
    "classifier_dropout": 0.0,
    "is_encoder_decoder": True,
    "use_cache": True,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "forced_eos_token_id": 2,
    "tie_word_embeddings": True,  # lm_head.weight is model.shared.weight
    "tokenizer_class": "MBart50Tokenizer",
}

# xlm-roberta-large config.json (the hub's says XLMRobertaForMaskedLM; M-CLIP loads it with AutoModel).
XLM_ROBERTA_LARGE = {
    "model_type": "xlm-roberta",
    "architectures": ["XLMRobertaForMaskedLM"],
    "vocab_size": 250002,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,  # 512 + pad offset 2
    "type_vocab_size": 1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,  # XLMRobertaConfig() defaults to 1e-12
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "output_past": True,
}

# openai/clip-vit-base-patch32 config.json (only the fields that are not the library defaults' noise).
CLIP_VIT_B_32 = {
    "model_type": "clip",
    "architectures": ["CLIPModel"],
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0,
    "text_config": {
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": 512,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "image_size": 224,
        "patch_size": 32,  # 7 x 7 = 49 patches + CLS
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "projection_dim": 512,
    },
}

# M-CLIP/XLM-Roberta-Large-Vit-B-32 config.json: XLM-R large, mean pooling, Linear(1024 -> 512).
MCLIP_XLMR_LARGE_VIT_B_32 = {
    "model_type": "M-CLIP",
    "architectures": ["MultilingualCLIP"],
    "modelBase": "xlm-roberta-large",
    "transformerDimensions": 1024,
    "numDims": 512,
}


def _unique_param_count(module):
    # parameters() already yields a tied tensor once; dedupe by identity anyway, buffers are not counted
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def hf_param_counts():
    """Parameter counts of the real Hugging Face models, built on the meta device from the dicts above.

    mbart: MBartForConditionalGeneration (lm_head tied to shared counted once; final_logits_bias is a buffer);
    xlmr: XLMRobertaModel(add_pooling_layer=False) (M-CLIP never uses the pooler);
    clip_vision: CLIPVisionModelWithProjection's vision_model + visual_projection."""
    import transformers as tf

    def config(cls, d):
        d = {k: v for k, v in d.items() if k not in ("model_type", "architectures")}
        return cls(**d)

    with torch.device("meta"):
        mbart = tf.MBartForConditionalGeneration(config(tf.MBartConfig, MBART_LARGE_50))
        xlmr = tf.XLMRobertaModel(config(tf.XLMRobertaConfig, XLM_ROBERTA_LARGE), add_pooling_layer=False)
        vision_cfg = tf.CLIPVisionConfig(**{k: v for k, v in CLIP_VIT_B_32["vision_config"].items()
                                            if k != "model_type"})
        vision = tf.CLIPVisionModelWithProjection(vision_cfg)
    assert mbart.lm_head.weight is mbart.model.shared.weight, "mBART's lm_head should be tied to shared"
    return {
        "mbart": _unique_param_count(mbart),
        "xlmr": _unique_param_count(xlmr),
        "clip_vision": _unique_param_count(vision.vision_model) + _unique_param_count(vision.visual_projection),
    }


if __name__ == "__main__":
    print(hf_param_counts())
