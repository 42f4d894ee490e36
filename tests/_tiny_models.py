"""Tiny offline models and tokenizers for integration tests (no downloads, a few thousand parameters)."""

from __future__ import annotations

import string

import torch

from calibrl.model import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

# the tiny tokenizer's own pad / eos / unk, then the chat and vision tokens of the Qwen2-VL vocabulary
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", *(token for token in QWEN_SPECIAL_TOKENS if token != "<|endoftext|>")]
CHARS = list(string.ascii_letters + string.digits + " .,:?!<>/=+-_'\"\n")

# A ChatML template (what Qwen2-VL's processor expects), written for these tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer():
    """A character-level PreTrainedTokenizerFast built in memory with the `tokenizers` library."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters back to text without separators
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# The width of the language model of every tiny model; a vision tower's merger projects its patches to it.
TEXT_WIDTH = 32


def tiny_text_config(vocab_size: int, **overrides) -> dict:
    """The settings of the language model of every tiny model of the tests (one layer of width TEXT_WIDTH, two
    attention heads sharing one key/value head), with ``overrides``."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return {**settings, **overrides}


def tokenizer_text_config(tokenizer, **overrides) -> dict:
    """``tiny_text_config`` for ``tokenizer``: its vocabulary size and its eos / pad token ids."""
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tiny_text_config(len(tokenizer), **ids, **overrides)


def tiny_vl_config(config_class, tokenizer, vision_config: dict, tie_word_embeddings: bool = False, **text_overrides):
    """A ``config_class`` (Qwen2-VL or Qwen2.5-VL) for ``tokenizer``: the tiny language model with
    ``text_overrides``, the ``vision_config`` tower and the tokenizer's vision token ids."""
    return config_class(
        text_config=tokenizer_text_config(tokenizer, tie_word_embeddings=tie_word_embeddings, **text_overrides),
        vision_config=vision_config,
        **vision_token_ids(tokenizer),
        tie_word_embeddings=tie_word_embeddings,
    )


def vision_token_ids(tokenizer) -> dict:
    """The image / video / vision-delimiter token ids of ``tokenizer`` as a Qwen2-VL config names them."""
    tokens = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}


def tiny_causal_lm(vocab_size: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**tiny_text_config(vocab_size, max_position_embeddings=256))
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model


def tiny_qwen2_vl(tokenizer, seed: int = 0):
    """A Qwen2-VL-architecture model (vision 1 layer x 32, text 1 layer x TEXT_WIDTH) and its processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=TEXT_WIDTH,  # the merger's output
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    mrope = {"type": "mrope", "mrope_section": [2, 3, 3]}
    config = tiny_vl_config(
        Qwen2VLConfig, tokenizer, vision, max_position_embeddings=512, rope_scaling=mrope, bos_token_id=None
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = _image_only_processor_class()(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor


def _image_only_processor_class():
    """Qwen2VLProcessor without its video processor (which needs torchvision, absent here)."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor
