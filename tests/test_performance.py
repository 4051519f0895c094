"""The speed levers keep the numbers: the lean sampler draws what `generate` draws, frozen
bf16 weights give what autocast gives, reusing the rollout's forward and micro-batching
give the update of the plain step; and `rlhf bench` counts FLOPs as written down here."""

import copy
import json
import os
import sys
import textwrap

import pytest
import torch
import yaml

from distributed_worker import FixedGenerator, fixed_rollout
from rlhf import memory, onednn
from rlhf.bench import ModelCost, StepShape, MachineRates, format_result, model_cost, phase_floors, run_bench
from rlhf.config import Config, RolloutConfig
from rlhf.data import left_pad
from rlhf.models import load_policy, load_tokenizer
from rlhf.ppo import PPOTrainer
from rlhf.backend import CPUBackend, frozen_linears_to_bf16
from rlhf.errors import NonFiniteError
from rlhf.experience import Rollout
from rlhf.precision import FP32
from rlhf.rollout import generate, policy_forward, sample, truncate_after_eos
from tiny import tiny_llama


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.9)])
def test_lean_sampler_draws_what_generate_draws(tiny_policy_dir, early_stop, top_k, top_p):
    from transformers import GenerationConfig

    tok, model = load_tokenizer(tiny_policy_dir), load_policy(tiny_policy_dir).eval()
    ids, mask = left_pad([tok(t)["input_ids"] for t in ("hello there", "hi", "abc def ghi")], tok.pad_token_id)
    cfg = RolloutConfig(max_new_tokens=12, temperature=0.7, early_stop=early_stop, top_k=top_k, top_p=top_p,
                        packed_decoding=False, inverse_cdf_sampling=False)
    torch.manual_seed(1)
    ours = generate(model, ids, mask, cfg, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(1)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
        do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p, max_new_tokens=12,
        eos_token_id=tok.eos_token_id if early_stop else None, pad_token_id=tok.pad_token_id,
        output_scores=True, return_dict_in_generate=True))
    theirs, theirs_mask, _ = truncate_after_eos(out.sequences[:, ids.shape[1]:], tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(ours.response_ids, theirs)
    logprobs = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, theirs[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.gen_logprobs, logprobs * theirs_mask)


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_inverse_cdf_sampler_draws_each_token_with_its_probability(scale):
    torch.manual_seed(0)
    logits = torch.randn(60) * 2
    logits[[0, 7, 59]] = -torch.inf  # filtered tokens: the first, one inside, the last
    probs = torch.softmax(logits, -1) * scale  # also rows that do not sum to 1
    n = 400_000
    counts = torch.bincount(sample(probs.expand(n, -1).contiguous()), minlength=60).double()
    assert counts[[0, 7, 59]].sum() == 0
    expected = n * probs.double() / probs.double().sum()
    kept = expected > 0
    chi2 = (((counts - expected)[kept]) ** 2 / expected[kept]).sum().item()
    assert chi2 < 56 + 5 * (2 * 56) ** 0.5  # 56 degrees of freedom: mean 56, sd 10.6


def test_sampler_refuses_non_finite_probabilities():
    probs = torch.softmax(torch.tensor([[0.0, 1.0], [torch.nan, 1.0]]), -1)
    for inverse_cdf in (True, False):
        with pytest.raises(NonFiniteError, match="non-finite policy probabilities"):
            sample(probs, inverse_cdf)


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_lean_generation_keeps_the_log_probs_a_full_forward_gives(tiny_policy_dir, early_stop, packed):
    # The KV cache, positions under left padding and the packed decoding weights are right
    # if the sampler's own log-probs are those of one forward over the finished sequences.
    tok, model = load_tokenizer(tiny_policy_dir), load_policy(tiny_policy_dir).eval()
    ids, mask = left_pad([tok(t)["input_ids"] for t in ("hello there", "hi", "abc def ghi")], tok.pad_token_id)
    cfg = RolloutConfig(max_new_tokens=12, temperature=0.7, early_stop=early_stop, packed_decoding=packed)
    torch.manual_seed(1)
    decoding = CPUBackend("cpu", FP32, rollout_cfg=cfg).decoding  # the backend applies the packing
    rollout = generate(model, ids, mask, cfg, tok.eos_token_id, tok.pad_token_id, decoding=decoding)
    recomputed = policy_forward(model, rollout, 0.7)[0] * rollout.response_mask
    torch.testing.assert_close(rollout.gen_logprobs, recomputed, rtol=0, atol=1e-4 if packed else 1e-5)


def test_frozen_bf16_linears_give_the_autocast_numbers(tiny_policy_dir):
    model = load_policy(tiny_policy_dir).eval().requires_grad_(False)
    stored_bf16 = frozen_linears_to_bf16(copy.deepcopy(model))
    assert any(p.dtype == torch.bfloat16 for p in stored_bf16.parameters())
    ids = torch.randint(4, 200, (3, 10))
    rollout = Rollout(ids[:, :6], torch.ones(3, 6, dtype=torch.long), ids[:, 6:], torch.ones(3, 4),
                      torch.ones(3, dtype=torch.bool))
    assert torch.equal(policy_forward(model, rollout, 0.7, "bfloat16")[0],
                       policy_forward(stored_bf16, rollout, 0.7, "bfloat16")[0])


REWARDS = '''
def by_prompt(prompts, responses):
    return [r.count("a") / max(len(r), 1) + 0.1 * len(p) for p, r in zip(prompts, responses)]
'''


def _config(tmp_path, policy_dir, name) -> Config:
    """A tiny policy with a critic started from it, the `rewards` fixture's prompts and
    reward, rollout batch 4, one thread."""
    cfg = Config()
    cfg.model.policy, cfg.model.critic = str(policy_dir), "policy"
    cfg.reward.function = "perf_rewards:by_prompt"
    cfg.data.prompts, cfg.data.chat_template = str(tmp_path / "prompts.txt"), False
    cfg.rollout.batch_size, cfg.train.out_dir, cfg.train.threads = 4, str(tmp_path / name), 1
    return cfg


def _one_step(tmp_path, policy_dir, name, **changes) -> dict:
    cfg = _config(tmp_path, policy_dir, name)
    cfg.ppo.lr, cfg.ppo.kl_coef = 1e-3, 0.1
    cfg.train.progress, cfg.train.report = False, False
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    trainer = PPOTrainer(cfg)
    trainer.generator = FixedGenerator(trainer)  # responses of different lengths
    trainer.step_once()
    critic = trainer.value_head if trainer.critic is None else trainer.accelerator.unwrap_model(trainer.critic)
    return {**{k: v.clone() for k, v in trainer.models.unwrapped_policy().state_dict().items()},
            **{f"critic.{k}": v.clone() for k, v in critic.state_dict().items()}}


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    (tmp_path / "perf_rewards.py").write_text(textwrap.dedent(REWARDS))
    (tmp_path / "prompts.txt").write_text("hello there\nthe sea is\ntell me\nonce upon a time\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("changes", [
    {"ppo__reuse_rollout_forward": False},  # a separate no-grad pass for the old log-probs
    {"ppo__micro_batch_size": 1},  # gradient accumulation over sequences of different lengths
    {"model__gradient_checkpointing": True},  # activations recomputed in the backward pass
    {"model__gradient_checkpointing": "selective"},  # element-wise operations recomputed
], ids=["separate-forward", "micro-batches", "checkpointing", "selective-checkpointing"])
def test_the_update_does_not_depend_on_how_the_work_is_split(tmp_path, tiny_policy_dir, rewards, changes):
    reference = _one_step(tmp_path, tiny_policy_dir, "reference")
    other = _one_step(tmp_path, tiny_policy_dir, "other", **changes)
    initial = load_policy(tiny_policy_dir).state_dict()
    assert max((reference[k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    assert max((reference[k] - reference[f"critic.{k}"]).abs().max().item()  # the critic trained too
               for k in initial if f"critic.{k}" in reference) > 1e-4
    for name, weight in reference.items():
        torch.testing.assert_close(other[name], weight, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_every_loss_aggregation_keeps_the_update_under_micro_batching(tmp_path, tiny_policy_dir, rewards, mode):
    whole = _one_step(tmp_path, tiny_policy_dir, "whole", ppo__loss_agg=mode)
    micro = _one_step(tmp_path, tiny_policy_dir, "micro", ppo__loss_agg=mode, ppo__micro_batch_size=1)
    token_mean = _one_step(tmp_path, tiny_policy_dir, "token-mean")
    assert max((whole[k] - token_mean[k]).abs().max().item() for k in whole) > 1e-6  # the mode matters
    for name, weight in whole.items():
        torch.testing.assert_close(micro[name], weight, rtol=0, atol=2e-6, msg=name)


def test_floor_counts_flops_as_written():
    # One layer, linear weights 100, head 10, attention width 4; two sequences of 3 and 5
    # tokens: 2*100*8 trunk + 2*10*2 head + 4*1*4*(3*4/2 + 5*6/2) attention.
    cost = ModelCost(trunk_params=100, head_params=10, layers=1, attn_width=4, kv_width=2)
    assert cost.forward_flops([3, 5], head_tokens=2) == 1600 + 40 + 16 * 21
    # Full fine-tuning, fp32 at 1 GFLOP/s, no decoding (one generated token): scoring is
    # four forwards; the update a forward and a backward (2x) of policy and critic.
    shape = StepShape(prompt_lengths=[2, 4], response_lengths=[1, 1], generated_width=1)
    rates = MachineRates(fp32_gflops=1.0, bf16_gflops=4.0, memory_gbs=1e9, fp32_mm_gflops=0.5)
    f = phase_floors(shape, rates, "float32", cost, cost, cost, epochs=1, trainable_params=0)
    forward = cost.forward_flops([3, 5], 2) / 1e9
    assert f.score_s == pytest.approx(forward + forward + 2 * cost.forward_flops([3, 5], 8) / 1e9)
    assert f.update_s == pytest.approx(3 * forward + 3 * cost.forward_flops([3, 5], 8) / 1e9)
    assert f.generation_s == pytest.approx(cost.forward_flops([2, 4], 2) / 1e9)
    at_torch_matmul = phase_floors(shape, rates, "float32", cost, cost, cost, 1, 0, torch_mm=True)
    assert at_torch_matmul.step_s == pytest.approx(2 * f.step_s)


def test_model_cost_reads_the_modules(tiny_policy_dir):
    model = load_policy(tiny_policy_dir)
    cost = model_cost(model)
    config = model.config
    assert cost.head_params == config.vocab_size * config.hidden_size
    per_layer = 4 * config.hidden_size**2 + 3 * config.hidden_size * config.intermediate_size
    assert cost.trunk_params == config.num_hidden_layers * per_layer


def test_bench_prints_one_json_object_with_the_documented_keys(tmp_path, tiny_policy_dir, rewards, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"policy": str(tiny_policy_dir), "critic": "policy"},
        "reward": {"function": "perf_rewards:by_prompt"},
        "data": {"prompts": str(tmp_path / "prompts.txt"), "chat_template": False},
        "rollout": {"batch_size": 2, "max_new_tokens": 4, "early_stop": False},
        "train": {"threads": 1},
    }))
    result = run_bench(str(config), ["ppo.lr=0.0001"], steps=2, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["median_step_s"] == result["median_step_s"] > 0
    for key in ("median_step_s", "tokens_per_s", "peak_rss_gb", "floor_ratio", "phases", "machine"):
        assert key in printed
    assert set(printed["phases"]) == {"generation", "score", "update"}
    assert printed["steps_timed"] == 1 and printed["setup"]["response_tokens_mean"] == 4
    assert isinstance(printed["median_step_system_s"], float) and isinstance(printed["median_step_minor_faults"], (int, float))
    assert "kernel time per step:" in format_result(printed)


def test_lora_layers_decode_with_their_merged_weight(tiny_policy_dir):
    # W + scaling * B A packed as one weight: the sampler's log-probs are still those of the
    # adapter-on forward, and the model is left as it was (no packed forward remains).
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_policy_dir)
    model = get_peft_model(load_policy(tiny_policy_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter, not the zero start
    ids, mask = left_pad([tok(t)["input_ids"] for t in ("hello there", "hi")], tok.pad_token_id)
    torch.manual_seed(1)
    cfg = RolloutConfig(max_new_tokens=10)
    rollout = generate(model, ids, mask, cfg, tok.eos_token_id, tok.pad_token_id,
                       decoding=CPUBackend("cpu", FP32, rollout_cfg=cfg).decoding)
    recomputed = policy_forward(model, rollout, 0.7)[0] * rollout.response_mask
    torch.testing.assert_close(rollout.gen_logprobs, recomputed, rtol=0, atol=1e-4)
    assert not any("forward" in m.__dict__ or hasattr(m, "_rlhf_packed") for m in model.modules())


def test_fp32_attention_under_bf16_autocast(tiny_policy_dir):
    # The linear layers run in bf16, attention in fp32: the attention inputs reach the
    # kernel as fp32 even inside the autocast region.
    from rlhf.backend import fp32_attention

    model = fp32_attention(load_policy(tiny_policy_dir).eval())
    assert model.config._attn_implementation == "rlhf_fp32_sdpa"
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, *args, **kwargs)

    ids = torch.randint(4, 200, (2, 9))
    rollout = Rollout(ids[:, :5], torch.ones(2, 5, dtype=torch.long), ids[:, 5:], torch.ones(2, 4),
                      torch.ones(2, dtype=torch.bool))
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        logprobs = policy_forward(model, rollout, 0.7, "bfloat16")[0]
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)
    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()


def test_fast_settings_train_a_step(tmp_path, tiny_policy_dir, rewards):
    # bf16 autocast, LoRA, value head: every lever of the fast path in one step.
    before = load_policy(tiny_policy_dir).state_dict()
    after = _one_step(tmp_path, tiny_policy_dir, "fast", model__dtype="bfloat16", model__lora=True,
                      model__value_head=True)
    lora = {k: v for k, v in after.items() if "lora_B" in k}
    assert lora and any(v.abs().max() > 0 for v in lora.values())  # the adapters moved off zero
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    # The base stays frozen (its linear weights stored in bf16, the values autocast uses).
    assert all(torch.equal(base[k], before[k].to(base[k].dtype)) for k in before)


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_gives_the_forward_and_gradients_of_a_plain_linear(bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40, bias=bias)
    routed = onednn.use_onednn(copy.deepcopy(plain))
    x = torch.randn(3, 7, 24)
    outs, grads = [], []
    for layer in (plain, routed):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _lean_mlps(model) -> list:
    """The modules of `model` whose forward use_onednn replaced by the lean gated MLP."""
    return [m for m in model.modules()
            if getattr(m.__dict__.get("forward"), "__func__", None) is onednn._gated_mlp_forward]


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
def test_onednn_gated_mlp_keeps_two_intermediate_tensors_and_gives_the_same_gradients():
    torch.manual_seed(0)
    lean = onednn.use_onednn(tiny_llama(vocab_size=64, hidden=32, layers=3))
    plain = copy.deepcopy(lean)
    mlps = _lean_mlps(plain)
    assert len(mlps) == 3
    for mlp in mlps:
        del mlp.forward  # autograd's own graph for act(gate) * up, the same oneDNN linears
    width = plain.config.intermediate_size
    ids = torch.randint(0, 64, (3, 11))
    results = []
    for model in (plain, lean):
        kept = {}

        def pack(t):
            if t.numel() == ids.numel() * width:  # activations (any shape), not the down projection's weight
                kept[t.untyped_storage().data_ptr()] = t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}, len(kept)))
    (plain_logits, plain_grads, plain_kept), (lean_logits, lean_grads, lean_kept) = results
    assert (plain_kept, lean_kept) == (4 * 3, 2 * 3)  # gate, act(gate), up, product -> gate, up
    assert torch.equal(lean_logits, plain_logits)
    assert plain_grads.keys() == lean_grads.keys()
    assert all(torch.equal(lean_grads[n], plain_grads[n]) for n in plain_grads)


@pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("mode", [False, True, "selective"])
def test_trainer_uses_the_lean_mlp_only_without_checkpointing(tmp_path, tiny_policy_dir, rewards, mode):
    cfg = _config(tmp_path, tiny_policy_dir, "run")
    cfg.model.gradient_checkpointing = mode
    trainer = PPOTrainer(cfg)
    for model in (trainer.models.unwrapped_policy(), trainer.accelerator.unwrap_model(trainer.critic)):
        assert len(_lean_mlps(model)) == (model.config.num_hidden_layers if mode is False else 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_keeps_a_freed_large_block_in_the_process():
    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    assert memory.keep_freed_memory()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
    before = resident_mib()
    del block
    assert resident_mib() > before - 16  # not unmapped: the next tensor reuses the pages


def test_frozen_bf16_weights_release_the_mapped_checkpoint(tiny_policy_dir):
    # transformers maps safetensors files into memory (storages that cannot be resized); one
    # fp32 tensor left pointing into the file keeps all of it resident.
    model = load_policy(tiny_policy_dir).eval().requires_grad_(False)
    assert not any(p.untyped_storage().resizable() for p in model.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen_linears_to_bf16(model)
    assert all(p.untyped_storage().resizable() for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name].to(p.dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpointing_keeps_the_update_of_lora_with_a_value_head(tmp_path, tiny_policy_dir, rewards, dtype):
    """Checkpointing under LoRA (peft wraps the checkpointed model) and a value head on the
    checkpointed trunk, in fp32 and under bf16 autocast: the update of the plain step."""
    fast = dict(model__lora=True, model__value_head=True, model__dtype=dtype)
    reference = _one_step(tmp_path, tiny_policy_dir, "plain", **fast)
    assert max(v.abs().max().item() for k, v in reference.items() if "lora_B" in k) > 1e-4  # starts at 0: it trained
    for mode in (True, "selective"):
        other = _one_step(tmp_path, tiny_policy_dir, f"checkpointed-{mode}", model__gradient_checkpointing=mode, **fast)
        assert other.keys() == reference.keys()
        for name, weight in reference.items():
            torch.testing.assert_close(other[name], weight, rtol=0, atol=2e-6, msg=f"{mode}: {name}")


def _saved_and_flops(trainer) -> tuple[int, float]:
    """Bytes that the loss forward keeps for the backward pass outside checkpointed layers,
    and the FLOPs of that forward and its backward."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = []
    rollout = fixed_rollout(trainer, [0, 1, 2, 3])
    with FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            out = trainer.models.train_forward(rollout, torch.arange(4))
            logprobs, values = out.logprobs, out.values
        (logprobs.sum() + values.sum()).backward()
    return sum(saved), flops.get_total_flops()


def test_checkpointing_recomputes_activations_of_policy_and_critic(tmp_path, tiny_policy_dir, rewards):
    """Full checkpointing keeps (almost) nothing and runs the forward matmuls again in the
    backward; selective checkpointing keeps nothing outside its layers either, but runs no
    matmul twice."""
    def trainer(mode):
        cfg = _config(tmp_path, tiny_policy_dir, str(mode))
        cfg.model.gradient_checkpointing = mode
        cfg.model.onednn_matmul = False  # torch's matmuls, which the FLOP counter knows
        return PPOTrainer(cfg)

    (plain_saved, plain_flops), (full_saved, full_flops), (sel_saved, sel_flops) = (
        _saved_and_flops(trainer(mode)) for mode in (False, True, "selective"))
    assert full_saved < plain_saved / 4 and sel_saved < plain_saved / 4
    assert sel_flops == plain_flops
    assert full_flops > 1.15 * plain_flops  # the layers run forward twice (the vocabulary projection once)


def test_a_torch_without_the_onednn_linear_is_named(monkeypatch, caplog):
    # A torch release that dropped the private operator keeps working on its own kernels,
    # and says so once, when the backend is set up.
    from rlhf.config import ModelConfig, TrainConfig

    monkeypatch.setattr(onednn, "available", lambda: False)
    with caplog.at_level("WARNING"):
        CPUBackend("cpu", FP32, ModelConfig(), RolloutConfig()).setup_process(TrainConfig(keep_freed_memory=False))
    assert "no oneDNN linear operator" in caplog.text


def test_floor_counts_each_distinct_prompt_once_when_groups_share_it():
    # Two prompts of 3 and 5 tokens, two samples each, one response token: the prefill runs
    # the two distinct prompts; the forwards run them but their last token once each.
    cost = ModelCost(trunk_params=100, head_params=10, layers=1, attn_width=4, kv_width=2)
    shape = StepShape(prompt_lengths=[3, 3, 5, 5], response_lengths=[1] * 4, generated_width=1,
                      distinct_prompt_lengths=[3, 5])
    rates = MachineRates(fp32_gflops=1.0, bf16_gflops=4.0, memory_gbs=1e9, fp32_mm_gflops=1.0)
    plain = phase_floors(shape, rates, "float32", cost, None, None, epochs=1, trainable_params=0)
    shared = phase_floors(shape, rates, "float32", cost, None, None, 1, 0, shared_prefill=True, shared_forwards=True,
                          shared_update=True)
    assert plain.generation_s == pytest.approx(cost.forward_flops([3, 3, 5, 5], 4) / 1e9)
    assert shared.generation_s == pytest.approx(cost.forward_flops([3, 5], 2) / 1e9)
    saved = cost.forward_flops([2, 4], 0) / 1e9  # one copy of each prompt less its last token
    assert shared.score_s == pytest.approx(plain.score_s - 2 * saved)  # policy and reference
    assert shared.update_s == pytest.approx(plain.update_s - 3 * saved)  # forward and backward (2x)
    # Micro-batches smaller than the batch split the groups: the update counted row by row.
    split = phase_floors(shape, rates, "float32", cost, None, None, 1, 0, shared_prefill=True, shared_forwards=True)
    assert split.score_s == pytest.approx(shared.score_s) and split.update_s == pytest.approx(plain.update_s)
