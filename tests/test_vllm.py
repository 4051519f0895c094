"""rollout.engine=vllm: the vLLM generator against the trainer's own forward on a tiny model.

The engine tests run where vLLM is importable (its own environment: README, 'Generation with
vLLM') and are skipped elsewhere; the truncated importance weights are plain maths and run
everywhere. vLLM's CPU attention needs a head dimension of at least 32: the tiny policy here
has hidden 128 with 2 heads.
"""

import importlib.util
import os

import pytest
import torch

from rlhf import algos


def test_truncated_importance_weights_are_the_capped_probability_ratio():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, -2.5, -3.0]])
    w = algos.truncated_importance_weights(trainer, sampler, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, float(torch.exp(torch.tensor(0.5))), 2.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap: expected >= 1"):
        algos.truncated_importance_weights(trainer, sampler, cap=0.5)


def test_a_lora_policy_is_sent_merged_under_the_base_model_names():
    """What the engine loads from a LoRA policy: transformers' names, the adapters merged, the
    very weights peft's merge_and_unload gives (no vLLM needed)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from rlhf.vllm_generator import whole_weights
    from tiny import tiny_llama

    policy = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter (peft starts B at zero)
    sent = dict(whole_weights(policy))
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert sent.keys() == merged.keys()
    for name, weight in merged.items():
        torch.testing.assert_close(sent[name], weight, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(sent[n], w) for n, w in tiny_llama().state_dict().items())  # the update is in


def test_rollout_engine_is_validated_at_load():
    from rlhf.config import Config, ConfigError, from_dict

    with pytest.raises(ConfigError, match="rollout.engine: expected one of 'hf', 'vllm'"):
        from_dict(Config, {"rollout": {"engine": "sglang"}})
    with pytest.raises(ConfigError, match="ppo.tis_cap: expected a finite number >= 1, got 0.5"):
        from_dict(Config, {"ppo": {"tis_cap": 0.5}}).validate()


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (optional: README, 'Generation with vLLM')")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def vllm_policy_dir(tmp_path_factory):
    from tiny import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("vllm_policy")
    tokenizer = tiny_tokenizer(path)
    tiny_llama(hidden=128, layers=2, heads=2, tokenizer=tokenizer, seed=1).save_pretrained(path)
    return path


def _generator(path, temperature=1.0, max_new_tokens=12, **rollout):
    from rlhf.backend import make_backend
    from rlhf.config import RolloutConfig
    from rlhf.models import load_policy, load_tokenizer
    from rlhf.precision import Precision
    from rlhf.vllm_generator import VLLMGenerator

    tokenizer = load_tokenizer(path, "left")
    policy = load_policy(path).eval()
    cfg = RolloutConfig(temperature=temperature, max_new_tokens=max_new_tokens, engine="vllm",
                        vllm_kv_cache_gib=0.25, **rollout)
    backend = make_backend(torch.device("cpu"), Precision("float32"))
    return VLLMGenerator(policy, cfg, tokenizer, backend, model_path=str(path), seed=0, max_prompt_tokens=32), \
        policy, tokenizer, cfg


def _recomputed(policy, rollout, temperature):
    from rlhf.rollout import policy_forward

    with torch.no_grad():
        return policy_forward(policy, rollout, temperature)[0] * rollout.response_mask


@needs_vllm
def test_vllm_samples_score_as_the_trainer_scores_them_before_and_after_a_weight_sync(vllm_policy_dir):
    gen, policy, tokenizer, cfg = _generator(vllm_policy_dir, temperature=0.8)
    prompts = [tokenizer("hello there")["input_ids"], tokenizer("the sea")["input_ids"], tokenizer("why")["input_ids"]]
    rollout = gen.generate(prompts)
    assert rollout.response_ids.shape[0] == 3 and rollout.response_mask.sum() > 0
    assert rollout.gen_logprobs is not None
    gap = (rollout.gen_logprobs - _recomputed(policy, rollout, cfg.temperature)).abs().max().item()
    assert gap < 1e-3, gap

    # The trained weights move: after update_weights the engine samples from the new policy.
    import copy

    before = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen.update_weights(policy)
    rollout = gen.generate(prompts)
    gap = (rollout.gen_logprobs - _recomputed(policy, rollout, cfg.temperature)).abs().max().item()
    assert gap < 1e-3, gap
    stale = (rollout.gen_logprobs - _recomputed(before, rollout, cfg.temperature)).abs().max().item()
    assert stale > 100 * max(gap, 1e-5), (stale, gap)  # the engine did not keep the old weights


@needs_vllm
def test_a_run_sampling_with_vllm_learns(tmp_path, monkeypatch, vllm_policy_dir):
    """The PPO loop with rollout.engine=vllm (and the truncated importance correction) raises
    the share of vowels as the HF sampler does (tests/test_ppo.py); the engine's log-probs stay
    within rounding of the trainer's at every step, so its weights followed every update."""
    import textwrap

    from test_ppo import PROMPTS, REWARDS, make_config, mean_score, metrics

    from rlhf.ppo import PPOTrainer

    (tmp_path / "ppo_test_rewards.py").write_text(textwrap.dedent(REWARDS))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    steps = 30
    cfg = make_config(tmp_path, vllm_policy_dir, "vllm", train__steps=steps, rollout__engine="vllm",
                      rollout__vllm_kv_cache_gib=0.25, ppo__tis_cap=2.0,
                      reward__function="ppo_test_rewards:share_of_vowels")
    PPOTrainer(cfg).train()
    rows = metrics(tmp_path / "vllm")
    assert len(rows) == steps
    first, last = mean_score(rows[:5]), mean_score(rows[-5:])
    assert last > first + 0.2, (first, last)
    assert max(r["policy/logprob_gap"] for r in rows) < 1e-3


@needs_vllm
def test_sleep_mode_where_vllm_has_none_is_one_line(vllm_policy_dir):
    """vLLM's sleep mode exists on GPUs only: asked for on a CPU, the error names the field."""
    from rlhf.errors import UserInputError

    if torch.cuda.is_available():
        pytest.skip("a GPU has sleep mode")
    with pytest.raises(UserInputError, match="rollout.vllm_sleep: vLLM has no sleep mode on this platform"):
        _generator(vllm_policy_dir, vllm_sleep=True)


@needs_vllm
def test_fsdp2_on_two_processes_syncs_gathered_weights_into_each_engine(tmp_path, vllm_policy_dir):
    """Two FSDP2 processes, each with its own in-process vLLM engine: the sharded policy is
    gathered into the engine before every rollout, so the engine's log-probs stay within
    rounding of the trainer's at every step (stale weights would show a gap from step 2)."""
    import json

    import yaml

    from test_distributed import _launch, _write_inputs

    _write_inputs(tmp_path, 'len(set(r)) / max(len(r), 1)')
    data = {"model": {"policy": str(vllm_policy_dir), "critic": "policy"},
            "reward": {"function": "dist_rewards:share_of_a"},
            "data": {"prompts": str(tmp_path / "prompts.txt"), "chat_template": False},
            "rollout": {"batch_size": 2, "max_new_tokens": 8, "temperature": 1.0, "engine": "vllm",
                        "vllm_kv_cache_gib": 0.25},
            "ppo": {"lr": 1e-2, "epochs": 2, "minibatch_size": 1},
            "train": {"out_dir": str(tmp_path / "run"), "steps": 3, "save_every": 0, "progress": False,
                      "report": False, "threads": 1, "distributed": "fsdp2"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    _launch(tmp_path, "-m", "rlhf", "ppo", str(tmp_path / "run.yaml"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(r["policy/logprob_gap"] for r in rows) < 1e-4, [r["policy/logprob_gap"] for r in rows]
    assert max(r["policy/approx_kl"] for r in rows) > 1e-4  # the updates moved the policy between rollouts


@needs_vllm
def test_vllm_samples_from_a_lora_policy_merged(vllm_policy_dir):
    from peft import LoraConfig, get_peft_model

    gen, policy, tokenizer, cfg = _generator(vllm_policy_dir)
    lora = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    gen.update_weights(lora)
    rollout = gen.generate([tokenizer("hello there")["input_ids"], tokenizer("why")["input_ids"]])
    gap = (rollout.gen_logprobs - _recomputed(lora, rollout, cfg.temperature)).abs().max().item()
    with lora.disable_adapter():
        base_gap = (rollout.gen_logprobs - _recomputed(lora, rollout, cfg.temperature)).abs().max().item()
    assert gap < 1e-3 < base_gap, (gap, base_gap)  # the adapter's policy, not the base model's
