"""Shared prompt prefixes (`rlhf.prefix`): a prompt computed once for the samples that share it
gives the numbers of the plain forward (log-probs, entropy, hidden states, gradients), the
sampler draws the same tokens, and a GRPO step ends with the same weights."""

import copy

import pytest
import torch

from rlhf import prefix
from rlhf.config import RolloutConfig
from rlhf.data import left_pad
from rlhf.experience import Rollout
from rlhf.rollout import generate, policy_forward
from tiny import tiny_llama


def test_shared_prompts_finds_the_rows_of_each_distinct_prompt():
    ids, mask = left_pad([[5, 6, 7], [5, 6, 7], [8, 9], [5, 6, 7], [8, 9], [4, 9]], 0)
    shared = prefix.shared_prompts(ids, mask)
    assert shared.first.tolist() == [0, 2, 5]  # first occurrences, in order
    assert shared.inverse.tolist() == [0, 0, 1, 0, 1, 2]
    assert torch.equal(ids[shared.first][shared.inverse], ids)


def test_shared_prompts_none_when_every_row_differs_or_only_padding_tells_them_apart():
    ids, mask = left_pad([[5, 6, 7], [6, 7], [1, 2]], 0)
    assert prefix.shared_prompts(ids, mask) is None
    # Same ids, another mask: a left-padded token 0 and a real token 0 are different prompts.
    ids = torch.tensor([[0, 3, 4], [0, 3, 4]])
    assert prefix.shared_prompts(ids, torch.tensor([[0, 1, 1], [1, 1, 1]])) is None
    assert prefix.shared_prompts(ids, torch.tensor([[1, 1, 1], [1, 1, 1]])) is not None
    assert prefix.shared_prompts(torch.tensor([[3], [3]]), torch.ones(2, 1, dtype=torch.long)) is None


def _group_rollout(vocab: int = 64, group: int = 3, response_width: int = 7) -> Rollout:
    """Three prompts (left-padded to different lengths), `group` samples each, responses of
    several lengths (one ended early: padding after its EOS)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 3, 6)]
    ids, mask = left_pad([p for p in prompts for _ in range(group)], 0)
    B = ids.shape[0]
    response = torch.randint(3, vocab, (B, response_width), generator=g)
    response_mask = torch.ones(B, response_width)
    response_mask[1, 4:] = 0
    response[1, 4:] = 0
    return Rollout(ids, mask, response, response_mask, torch.zeros(B, dtype=torch.bool))


def test_shared_prefix_forward_gives_the_plain_forward_and_its_gradients():
    # In float64. transformers' Llama computes its RMSNorm in fp32 whatever the dtype, so the
    # gradients that pass back through a norm agree to fp32's rounding (1e-7 of their size);
    # a gradient lost on the way through the copied cache would differ at order 1.
    _check_shared_prefix_forward(grad_rtol=1e-6)


def _check_shared_prefix_forward(grad_rtol):
    model = tiny_llama(layers=3).double().train()
    rollout = _group_rollout()
    m = rollout.response_mask
    weights = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for share in (False, True):
        outputs = policy_forward(model, rollout, 0.7, with_entropy=True, with_hidden=True, share_prefix=share)
        grads = []
        # The last hidden states, then log-probs and entropy (computed in fp32, algos).
        for loss in ((outputs[2] @ weights * m).sum(), ((outputs[0] + 0.1 * outputs[1]) * m).sum()):
            model.zero_grad()
            loss.backward(retain_graph=True)
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()])
        results.append((outputs, grads))
    (outs0, (hidden_g0, lp_g0)), (outs1, (hidden_g1, lp_g1)) = results
    for a, b in zip(outs1, outs0):
        shape = m.shape + (1,) * (a.dim() - 2)
        torch.testing.assert_close(a * m.view(shape), b * m.view(shape), rtol=0, atol=1e-10)
    for a, b in zip(hidden_g1, hidden_g0):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_rtol * a.abs().max().item())
    for a, b in zip(lp_g1, lp_g0):
        torch.testing.assert_close(a, b, rtol=10 * grad_rtol, atol=10 * grad_rtol * a.abs().max().item())
    # Tokens that occur only in prompts reach the loss only through the copied cache: their
    # embedding rows have the plain forward's gradient, and it is not zero.
    prompt_only = sorted(set(rollout.prompt_ids[rollout.prompt_mask.bool()].tolist())
                         - set(rollout.response_ids.flatten().tolist()))
    assert prompt_only
    embedding = hidden_g1[0][prompt_only]
    assert (embedding.abs().sum(-1) > 0).all()
    torch.testing.assert_close(embedding, hidden_g0[0][prompt_only], rtol=grad_rtol, atol=grad_rtol * embedding.abs().max().item())


def test_shared_prefix_forward_runs_the_prompt_once_per_distinct_prompt():
    model = tiny_llama().double()
    rollout = _group_rollout(group=4)
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    policy_forward(model, rollout, 1.0, share_prefix=True)
    hook.remove()
    P, R = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    assert seen == [(3, P - 1), (12, R)]
    # The cache the forward leaves behind holds the distinct prompts only, not every row's
    # keys and values of every layer.
    from rlhf.rollout import position_ids

    ids, mask = rollout.sequence_ids, rollout.attention_mask
    with torch.no_grad():
        out = prefix.forward(model, ids, mask, position_ids(mask), P, prefix.shared_prompts(rollout.prompt_ids,
                                                                                             rollout.prompt_mask))
    cache = out.past_key_values
    assert all(layer.keys.shape[:3:2] == (3, P - 1) and layer.values.shape[0] == 3 for layer in cache.layers)


@pytest.mark.parametrize("early_stop", [False, True])
def test_generation_with_a_shared_prefill_draws_the_same_tokens(early_stop):
    model = tiny_llama(layers=3).double()
    rollout = _group_rollout(group=3)
    base = dict(max_new_tokens=9, temperature=0.9, early_stop=early_stop, packed_decoding=False, samples_per_prompt=3)
    out = []
    for share in (False, True):
        torch.manual_seed(4)
        out.append(generate(model, rollout.prompt_ids, rollout.prompt_mask,
                            RolloutConfig(**base, share_prompt_prefix=share), eos_id=2, pad_id=0))
    assert torch.equal(out[0].response_ids, out[1].response_ids)
    torch.testing.assert_close(out[1].gen_logprobs, out[0].gen_logprobs, rtol=0, atol=1e-10)
    # The samples of a prompt differ: the copied cache does not tie their draws together.
    assert not torch.equal(out[1].response_ids[0], out[1].response_ids[1])


def test_generation_prefills_each_distinct_prompt_once():
    model = tiny_llama()
    rollout = _group_rollout(group=4)
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    generate(model, rollout.prompt_ids, rollout.prompt_mask,
             RolloutConfig(max_new_tokens=3, early_stop=False, packed_decoding=False, samples_per_prompt=4), 2, 0)
    hook.remove()
    assert seen == [(3, rollout.prompt_ids.shape[1]), (12, 1), (12, 1)]


def test_models_with_sliding_window_caches_keep_the_plain_forward():
    from transformers import MistralConfig, MistralForCausalLM

    assert prefix.supports_shared_prefix(tiny_llama())
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                               sliding_window=4))
    assert not prefix.supports_shared_prefix(sliding)


def test_grpo_steps_end_with_the_same_weights_with_and_without_shared_prefixes(tiny_policy_dir, tmp_path):
    from rlhf.config import Config
    from rlhf.ppo import PPOTrainer

    (tmp_path / "prompts.txt").write_text("say a\nsay b b\nhello there you\n")
    weights = []
    for share in (False, True):
        cfg = Config()
        cfg.model.policy, cfg.reward.function = str(tiny_policy_dir), "test_prefix:length_reward"
        cfg.data.prompts, cfg.data.chat_template = str(tmp_path / "prompts.txt"), False
        cfg.rollout.batch_size, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 3, 4, 6
        cfg.rollout.share_prompt_prefix = share
        cfg.ppo.algo, cfg.ppo.kl_coef, cfg.ppo.lr = "grpo", 0.05, 1e-3
        cfg.ppo.epochs, cfg.ppo.minibatch_size = 2, 6  # the whole batch kept, then halves re-run
        cfg.train.steps, cfg.train.out_dir, cfg.train.save_every = 2, str(tmp_path / f"run_{share}"), 0
        cfg.train.progress, cfg.train.report, cfg.train.threads, cfg.train.seed = False, False, 1, 3
        trainer = PPOTrainer(cfg)
        assert trainer.models.share_prefix is share
        for _ in range(2):
            trainer.step_once()
        weights.append(copy.deepcopy(trainer.models.unwrapped_policy().state_dict()))
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(v, weights[0][k]) for k, v in weights[1].items())  # rounded differently, not skipped


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "falcon", "opt"])
def test_other_architectures_give_the_plain_log_probs(arch):
    import transformers

    config = {
        "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128),
        "qwen2": lambda: transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2),
        "falcon": lambda: transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "opt": lambda: transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                              num_attention_heads=4, word_embed_proj_dim=32),
    }[arch]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    rollout = _group_rollout()
    assert prefix.supports_shared_prefix(model)
    plain = policy_forward(model, rollout, 1.0)[0]
    shared = policy_forward(model, rollout, 1.0, share_prefix=True)[0]
    m = rollout.response_mask
    torch.testing.assert_close(shared * m, plain * m, rtol=0, atol=1e-10)


def test_a_lora_policy_and_its_adapter_free_reference_give_the_plain_log_probs():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().double(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    rollout = _group_rollout()
    m = rollout.response_mask
    with_adapter = [policy_forward(model, rollout, 1.0, share_prefix=s)[0] * m for s in (False, True)]
    with model.disable_adapter():
        reference = [policy_forward(model, rollout, 1.0, share_prefix=s, prefix_model=model)[0] * m for s in (False, True)]
    torch.testing.assert_close(with_adapter[1], with_adapter[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(reference[1], reference[0], rtol=0, atol=1e-10)
    assert (with_adapter[0] - reference[0]).abs().max() > 1e-3  # the adapter was on, then off


def test_cache_keyword_reads_the_model_inside_ddp_and_peft(tmp_path):
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    class OlderModel(torch.nn.Module):  # a forward that still names the cache past_key_values
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert prefix.cache_keyword(OlderModel()) == "past_key_values"
    policy = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    assert prefix.cache_keyword(policy) == "cache"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert prefix.cache_keyword(DistributedDataParallel(policy)) == "cache"
        assert prefix.supports_shared_prefix(DistributedDataParallel(policy))
    finally:
        dist.destroy_process_group()


def test_generation_keeps_the_plain_prefill_for_sliding_window_models():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, sliding_window=4)).eval()
    rollout = _group_rollout(group=4)
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    out = generate(model, rollout.prompt_ids, rollout.prompt_mask,
                   RolloutConfig(max_new_tokens=3, early_stop=False, packed_decoding=False, samples_per_prompt=4), 2, 0)
    hook.remove()
    assert seen[0] == (12, rollout.prompt_ids.shape[1]) and out.response_ids.shape == (12, 3)


class _NoLogitsToKeep(torch.nn.Module):
    """A remote-code style model: its forward names its arguments and has no logits_to_keep."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, output_hidden_states=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _IgnoresLogitsToKeep(_NoLogitsToKeep):
    """One that swallows any keyword and returns logits for every position."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


@pytest.mark.parametrize("wrapper", [_NoLogitsToKeep, _IgnoresLogitsToKeep])
def test_a_model_without_logits_to_keep_is_one_clear_error(wrapper):
    from rlhf.errors import UserInputError

    with pytest.raises(UserInputError, match=rf"{wrapper.__name__}.* logits_to_keep"):
        policy_forward(wrapper(tiny_llama()), _group_rollout(), 1.0)


class _DropsCache(torch.nn.Module):
    """A model whose forward takes a KV cache and logits_to_keep but never passes the cache on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, cache_position=None,
                use_cache=False, logits_to_keep=0, output_hidden_states=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, output_hidden_states=output_hidden_states)


@pytest.mark.parametrize("wrapper", [_DropsCache, _IgnoresLogitsToKeep])
def test_a_shared_forward_through_a_model_that_ignores_the_cache_is_one_clear_error(wrapper):
    """Without the cache the response would be scored without its prompt: never silently."""
    from rlhf.errors import UserInputError

    with pytest.raises(UserInputError, match=rf"{wrapper.__name__} did not read the KV cache.*share_prompt_prefix"):
        policy_forward(wrapper(tiny_llama()), _group_rollout(), 1.0, share_prefix=True)


@pytest.mark.parametrize("samples", [1, 3])
def test_generation_with_a_model_that_ignores_the_cache_is_one_clear_error(samples):
    from rlhf.errors import UserInputError

    rollout = _group_rollout(group=3)
    with pytest.raises(UserInputError, match=r"_DropsCache did not fill the KV cache"):
        generate(_DropsCache(tiny_llama()), rollout.prompt_ids, rollout.prompt_mask,
                 RolloutConfig(max_new_tokens=3, packed_decoding=False, samples_per_prompt=samples), 2, 0)


def test_a_model_checkpointing_its_activations_keeps_the_plain_forward():
    """transformers drops the KV cache in checkpointed training: the model's own state counts,
    not only model.gradient_checkpointing in the config."""
    from rlhf.errors import UserInputError
    from rlhf.models import enable_activation_checkpointing

    model = tiny_llama().train()
    assert prefix.forwards_share(model, checkpointing=False, sharded=False)
    enable_activation_checkpointing(model, True)
    assert not prefix.forwards_share(model, checkpointing=False, sharded=False)
    with pytest.raises(UserInputError, match="did not read the KV cache"):
        policy_forward(model, _group_rollout(), 1.0, share_prefix=True)


@pytest.mark.parametrize("rope, shares", [(None, True), ({"rope_type": "linear", "factor": 2.0}, True),
                                          ({"rope_type": "dynamic", "factor": 2.0}, False),
                                          ({"rope_type": "longrope", "short_factor": [1.0] * 4,
                                            "long_factor": [2.0] * 4, "original_max_position_embeddings": 8}, False)])
def test_length_dependent_rotary_scaling_keeps_the_plain_forward(rope, shares):
    """Dynamic NTK and LongRoPE choose their frequencies from the length of the call: the
    prompt computed alone would be rotated for the prompt's length, not the sequence's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                         **({"rope_parameters": {"rope_theta": 10000.0, **rope}} if rope else {}))
    model = LlamaForCausalLM(config).double().eval()
    assert prefix.supports_shared_prefix(model) is shares
    if shares:  # a static scaling: the shared forward is the plain one
        rollout = _group_rollout(response_width=5)
        plain = policy_forward(model, rollout, 1.0)[0]
        torch.testing.assert_close(policy_forward(model, rollout, 1.0, share_prefix=True)[0], plain,
                                   rtol=0, atol=1e-10)


def test_a_forward_that_takes_no_cache_keeps_the_plain_forward():
    assert not prefix.supports_shared_prefix(_NoLogitsToKeep(tiny_llama()))
    assert not prefix.supports_shared_prefix(_IgnoresLogitsToKeep(tiny_llama()))
    assert prefix.supports_shared_prefix(_DropsCache(tiny_llama()))  # it names one: the forward's check catches it


def test_rotary_types_are_read_where_either_transformers_major_keeps_them():
    from types import SimpleNamespace

    assert prefix._rope_types(SimpleNamespace(rope_scaling={"type": "dynamic", "factor": 2.0})) == {"dynamic"}  # 4.x
    assert prefix._rope_types(SimpleNamespace(rope_parameters={"rope_type": "longrope"})) == {"longrope"}
    assert prefix._rope_types(SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "default"},
                                                               "sliding_attention": {"rope_type": "linear"}})) == {
        "default", "linear"}
    assert prefix._rope_types(SimpleNamespace()) == {"default"}
