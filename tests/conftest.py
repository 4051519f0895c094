"""Shared fixtures: tiny models saved to directories once per test session.

The builders live in tests/tiny.py (importable as `tiny` from any test module). They are
imported inside the fixtures so that tests which need no model never import transformers.
"""

import pytest


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A directory holding a tiny LlamaForCausalLM and its tokenizer (from_pretrained-ready)."""
    from tiny import save_tiny_policy

    return save_tiny_policy(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A directory holding a tiny one-label BertForSequenceClassification and its tokenizer."""
    from tiny import tiny_bert_classifier

    return tiny_bert_classifier(tmp_path_factory.mktemp("tiny_reward"))
