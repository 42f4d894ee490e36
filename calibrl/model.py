"""The policy: a tiny Qwen2-VL model built in code (default) or a local Hugging Face checkpoint.

Built in: a byte-level BPE tokenizer trained offline on the task's text (plus the Qwen chat and
vision special tokens and the reasoning tags as single tokens), and a Qwen2-VL-architecture model
(vision tower + language model, tied embeddings) sized by ``TrainConfig``. Images go through
transformers' PIL image processor (no torchvision needed); every ``<|image_pad|>`` in a prompt is
expanded to ``grid_thw.prod() // merge_size**2`` copies, one per merged visual token.

``--model PATH`` loads a local checkpoint instead: Qwen2-VL / Qwen2.5-VL (with its own processor)
or any text-only causal LM (images are then left out of the prompts).

Precision: every forward pass of the policy (sampling, old log-probs, the update, evaluation) runs under
the same autocast (``Policy.precision``), so the policy that samples is the policy whose log-probs are
the PPO ratio's denominator (docs/method.md: old log-probs are those of the sampling policy). Weights and
optimizer state stay fp32 (the master weights); ``--dtype bf16`` (and ``auto`` on CUDA) computes in bf16.

``PolicyForward`` is the module the update runs (and DDP wraps): it returns the final hidden states
at the positions that predict the response tokens, plus the lm_head weight, so that the loss can be
computed by ``calibrl_kernels.fused_linear_calibrl_loss`` without ever forming the logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import os
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
END_OF_TURN = "<|im_end|>"
DEFAULT_INSTRUCTION = "First think inside <think></think>, then give the final answer inside <answer></answer>."

# Qwen chat format; an image is <|vision_start|><|image_pad|><|vision_end|> before the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------------
# Tokenizer and tiny model, built offline
# ------------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic: sorted unique texts)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(sorted(set(texts)), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in TAG_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TURN,
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _mrope_section(head_dim: int) -> List[int]:
    """Qwen2-VL's split of the rotary frequencies into (time, height, width): 1/8, 3/16, 3/16 of head_dim."""
    if head_dim % 16:
        raise ValueError(f"hidden_size / num_heads: expected a multiple of 16 for M-RoPE, got head_dim {head_dim}")
    return [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]


def tiny_qwen2vl_config(tokenizer, cfg):
    """A Qwen2VLConfig of the size in ``cfg`` (a TrainConfig), token ids from ``tokenizer``."""
    from transformers import Qwen2VLConfig

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size: expected a multiple of num_heads={cfg.num_heads}, got {cfg.hidden_size}")
    head_dim = cfg.hidden_size // cfg.num_heads
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_ratio * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=max(1, cfg.num_heads // 2),
        max_position_embeddings=1024,
        rope_scaling={"type": "mrope", "mrope_section": _mrope_section(head_dim)},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids[END_OF_TURN],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=cfg.vision_depth,
        embed_dim=cfg.vision_dim,
        hidden_size=cfg.hidden_size,
        num_heads=max(1, cfg.vision_dim // 32),
        mlp_ratio=2,
        patch_size=cfg.patch_size,
        temporal_patch_size=1,
        spatial_merge_size=2,
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def pil_image_processor(image_size: int, patch_size: int):
    """Qwen2-VL image processor on the PIL backend, fixed to image_size x image_size pixels."""
    try:  # transformers >= 5.x with the backend split
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # older releases: the slow processor is the PIL/numpy one
        from transformers import Qwen2VLImageProcessor as cls
    factor = 2 * patch_size
    if image_size % factor:
        raise ValueError(f"image_size: expected a multiple of 2 * patch_size = {factor}, got {image_size}")
    pixels = image_size * image_size
    return cls(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size, temporal_patch_size=1, merge_size=2)


def autocast_dtype(device: torch.device, dtype: str) -> Optional[torch.dtype]:
    """The compute dtype of the policy's forward passes for ``--dtype``: bf16 autocast or None (fp32)."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def attention_implementation(device: torch.device, compute_dtype: Optional[torch.dtype]) -> str:
    """flash-attn where it can run, PyTorch SDPA otherwise.

    flash-attn needs a CUDA device, the package, and half-precision inputs: with fp32 weights that means
    every forward pass under a bf16/fp16 autocast (transformers then casts q/k/v to the autocast dtype).
    """
    half = compute_dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PromptBatch:
    """P prompts, left-padded so that generation can append to every row at the same position."""

    input_ids: torch.Tensor  # (P, Lp) int64, left padded with the pad token
    attention_mask: torch.Tensor  # (P, Lp) int64, 0 on padding
    pixel_values: List[Optional[torch.Tensor]]  # per prompt: (patches_i, patch_dim) or None (no image)
    image_grid_thw: List[Optional[torch.Tensor]]  # per prompt: (3,) int64 or None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def vision_inputs(self, prompt_index: torch.Tensor, device: torch.device) -> Dict[str, torch.Tensor]:
        """pixel_values / image_grid_thw for rows that repeat prompts ``prompt_index`` (R,), in row order."""
        pixels = [self.pixel_values[i] for i in prompt_index.tolist() if self.pixel_values[i] is not None]
        if not pixels:
            return {}
        grids = [self.image_grid_thw[i] for i in prompt_index.tolist() if self.image_grid_thw[i] is not None]
        return {"pixel_values": torch.cat(pixels).to(device), "image_grid_thw": torch.stack(grids).to(device)}


class ImageCache:
    """Decoded RGB images by path (easy-vqa's 64x64 PNGs are tiny; each is read once)."""

    def __init__(self):
        self._images: Dict[str, Image.Image] = {}

    def get(self, path: str) -> Image.Image:
        if path not in self._images:
            with Image.open(path) as image:
                self._images[path] = image.convert("RGB")
        return self._images[path]


# ------------------------------------------------------------------------------------------------
# The policy
# ------------------------------------------------------------------------------------------------
class Policy:
    """A causal LM (multimodal or not) with its tokenizer, image processor and prompt format."""

    def __init__(
        self, model, tokenizer, image_processor=None, instruction: str = "", compute_dtype: Optional[torch.dtype] = None
    ):
        self.model = model
        self.compute_dtype = compute_dtype  # autocast dtype of every forward pass; None: fp32
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.instruction = instruction
        self.images = ImageCache()
        self._accepted_sizes: set = set()  # image sizes (w, h) the image processor accepted
        vocab = tokenizer.get_vocab()
        self.multimodal = image_processor is not None and IMAGE_TOKEN in vocab
        self.image_token_id = vocab.get(IMAGE_TOKEN)
        self.end_token_id = vocab.get(END_OF_TURN, tokenizer.eos_token_id)  # ends every response
        self.stop_token_ids = sorted({i for i in (self.end_token_id, tokenizer.eos_token_id) if i is not None})
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_token_id
        # Tokens a response must never contain: a stray <|image_pad|> would break the next forward pass.
        self.suppressed_token_ids = [vocab[t] for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t in vocab]
        self.merge_size = getattr(image_processor, "merge_size", 2) if image_processor is not None else 1
        accepted = inspect.signature(model.forward).parameters
        self.accepts_mm_token_type_ids = "mm_token_type_ids" in accepted

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def precision(self):
        """The autocast context of every forward pass (generation, old log-probs, update, evaluation)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def prompt_text(self, question: str, with_image: bool) -> str:
        """The chat-formatted prompt ending with the assistant turn's header."""
        text = f"{question} {self.instruction}".strip() if self.instruction else question
        if with_image:
            content = [{"type": "image"}, {"type": "text", "text": text}]
        else:
            content = text
        messages = [{"role": "user", "content": content}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = "<|vision_start|><|image_pad|><|vision_end|>" if with_image else ""
        return f"<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"

    def special_tokens(self) -> List[str]:
        """The tokenizer's special tokens (chat, vision, end of text): never allowed inside a row's text."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return sorted(
            {t.content for t in added.values() if getattr(t, "special", False)} | set(self.tokenizer.all_special_tokens)
        )

    def check_example(self, example) -> None:
        """ValueError when ``example`` would fail once drawn: a special token in its question or expert (it
        would be read as chat structure or as image tokens), or an image that does not decode or that the
        image processor refuses (e.g. an extreme aspect ratio). Sizes already accepted are not re-checked."""
        for field in ("question", "expert"):
            found = [token for token in self.special_tokens() if token in getattr(example, field)]
            if found:
                raise ValueError(f"field '{field}' contains the tokenizer's special token(s) {found}")
        if not (self.multimodal and example.image is not None):
            return
        try:
            image = self.images.get(example.image)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on corrupt files
            raise ValueError(f"image {example.image} does not decode ({type(error).__name__}: {error})") from None
        if image.size not in self._accepted_sizes:
            try:
                self.image_processor(images=[image], return_tensors="pt")
            except (ValueError, RuntimeError) as error:
                raise ValueError(
                    f"image {example.image} of {image.size[0]}x{image.size[1]} pixels is refused by "
                    f"the image processor ({error})"
                ) from None
            self._accepted_sizes.add(image.size)

    def encode_prompts(self, examples: Sequence) -> PromptBatch:
        """Tokenised, left-padded prompts of ``examples`` with their images processed."""
        token_rows, pixel_values, grids = [], [], []
        for example in examples:
            with_image = self.multimodal and example.image is not None
            text = self.prompt_text(example.question, with_image)
            pixels = grid = None
            if with_image:
                processed = self.image_processor(images=[self.images.get(example.image)], return_tensors="pt")
                pixels, grid = processed["pixel_values"], processed["image_grid_thw"][0].long()
                count = int(grid.prod()) // self.merge_size**2
                if text.count(IMAGE_TOKEN) != 1:
                    raise ValueError(f"prompt: expected one {IMAGE_TOKEN} in the chat template's output, got {text!r}")
                text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * count)
            token_rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            pixel_values.append(pixels)
            grids.append(grid)
        width = max(len(row) for row in token_rows)
        input_ids = torch.full((len(token_rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_rows), width), dtype=torch.long)
        for i, row in enumerate(token_rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return PromptBatch(input_ids, attention_mask, pixel_values, grids)

    def encode_response(self, text: str) -> List[int]:
        """Token ids of a response text followed by the end-of-turn token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end_token_id]

    def decode_response(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: Dict[str, torch.Tensor]
    ) -> Dict:
        """Keyword arguments of a forward / generate call on these token rows."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **vision}
        if self.multimodal and self.accepts_mm_token_type_ids:
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()  # 1 on image tokens
        if "pixel_values" not in vision:  # text positions that skip the left padding (as generate does)
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return kwargs

    def save_pretrained(self, path: str) -> None:
        """Model, tokenizer and image processor in Hugging Face format (loadable with --model PATH)."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)


def build_tiny_policy(cfg, texts: Sequence[str], device: torch.device = torch.device("cpu"), tokenizer=None) -> Policy:
    """The built-in tiny Qwen2-VL policy, initialised from cfg.seed.

    The tokenizer is trained on ``texts`` unless one is given (a resumed run reuses its own).
    """
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else train_tokenizer(texts, cfg.vocab_size)
    config = tiny_qwen2vl_config(tokenizer, cfg)
    compute_dtype = autocast_dtype(device, cfg.dtype)
    config._attn_implementation = attention_implementation(device, compute_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2VLForConditionalGeneration(config)
    image_processor = pil_image_processor(cfg.image_size, cfg.patch_size)
    return Policy(model, tokenizer, image_processor, cfg.instruction or "", compute_dtype)


def load_policy(path: str, cfg, device: torch.device) -> Policy:
    """A local Hugging Face checkpoint: Qwen2-VL / Qwen2.5-VL with its processor, or a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"model: expected a local checkpoint folder, got {path!r} (nothing is downloaded)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    compute_dtype = autocast_dtype(device, cfg.dtype)
    options = dict(
        local_files_only=True, dtype=torch.float32, attn_implementation=attention_implementation(device, compute_dtype)
    )  # fp32 master weights; the forward passes autocast to compute_dtype
    if hasattr(config, "vision_config"):
        model = _vision_model_class(config).from_pretrained(path, **options)
        image_processor = _load_image_processor(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **options)
        image_processor = None
    instruction = DEFAULT_INSTRUCTION if cfg.instruction is None else cfg.instruction
    return Policy(model, tokenizer, image_processor, instruction, compute_dtype)


def _vision_model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if name.endswith("ForConditionalGeneration") and hasattr(transformers, name):
            return getattr(transformers, name)
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def _load_image_processor(path: str):
    """The checkpoint's image processor, preferring the PIL backend (no torchvision needed)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except (TypeError, ValueError, ImportError):
        return AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)


class PolicyForward(torch.nn.Module):
    """The update's forward pass (the module DDP wraps): hidden states at response-predicting positions.

    Rows are [left-padded prompt | right-padded response]; the hidden state at position t predicts
    token t + 1, so the T response tokens are predicted by the T positions ending one before the last.
    """

    def __init__(self, policy: Policy):
        super().__init__()
        self.model = policy.model
        self.policy = [policy]  # a list keeps the Policy out of the module tree

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, **vision):
        """input_ids, attention_mask (R, Lp + T) -> hidden (R, T, D), lm_head weight (V, D), bias (V,) or None."""
        policy = self.policy[0]
        kwargs = policy.model_inputs(input_ids, attention_mask, vision)
        with policy.precision():
            outputs = self.model.base_model(**kwargs, use_cache=False)
        hidden = outputs.last_hidden_state[:, -response_len - 1 : -1]  # (R, T, D), after the final norm
        if policy.compute_dtype is not None:
            # The final norm returns fp32 under autocast (fp32 residual stream); the lm_head matmul that
            # autocast would run in the compute dtype runs there in the fused loss too (calibrl.algorithms
            # casts the head to hidden's dtype): the bf16 kernels and tensor cores, not the fp32 FMA path.
            hidden = hidden.to(policy.compute_dtype)
        head = self.model.get_output_embeddings()
        return hidden, head.weight, head.bias
