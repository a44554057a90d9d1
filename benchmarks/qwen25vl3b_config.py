"""The architecture of Qwen/Qwen2.5-VL-3B-Instruct, written out so a random-init copy can be built offline.

Values are those of the published config.json of Qwen2.5-VL-3B-Instruct; only the special-token ids are taken from
the tokenizer in use (the bench uses calibrl's tiny tokenizer, so sampled ids beyond its vocabulary decode to "").
"""
from __future__ import annotations

TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    sliding_window=32768, max_window_layers=70, use_sliding_window=False, attention_dropout=0.0,
)
VISION = dict(
    depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
    out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
)


def qwen25vl_3b_config(tokenizer):
    """A `Qwen2_5_VLConfig` with the 3B architecture and the given tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    tid = tokenizer.convert_tokens_to_ids
    text = dict(TEXT, eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"), bos_token_id=None)
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(VISION), tie_word_embeddings=True,
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )
