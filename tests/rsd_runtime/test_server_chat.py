"""Chat prompts: a checkpoint's template renders as transformers renders it; the tiny model's fallback."""
from __future__ import annotations

import json
import shutil

import pytest

from rsd_runtime.server.chat import ChatTemplate
from rsd_runtime.tiny_model import ensure_tiny_model
from rsd_runtime.tokenizer import Tokenizer

# Shaped as Llama 3's template: bos, headers per role, an optional generation prompt.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
            "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hello there"}]


@pytest.fixture()
def model_with_template(tmp_path):
    src = ensure_tiny_model()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return tmp_path


@pytest.mark.parametrize("gen", [True, False])
def test_template_renders_and_tokenizes_as_transformers(model_with_template, gen):
    from transformers import AutoTokenizer

    ours = ChatTemplate.from_model_dir(model_with_template, Tokenizer.from_file(model_with_template))
    hf = AutoTokenizer.from_pretrained(str(model_with_template))
    assert ours.render(MESSAGES, gen) == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    hf_ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert ours.encode(MESSAGES, gen) == list(hf_ids)


def test_template_errors_name_the_messages(model_with_template):
    ours = ChatTemplate.from_model_dir(model_with_template, Tokenizer.from_file(model_with_template))
    with pytest.raises(ValueError, match="messages: .*bad role tool"):
        ours.render([{"role": "tool", "content": "x"}])


def test_fallback_without_template():
    folder = ensure_tiny_model()
    tok = Tokenizer.from_file(folder)
    ours = ChatTemplate.from_model_dir(folder, tok)
    assert ours.render(MESSAGES) == "system: Be brief. \nuser: Hello there\nassistant:"
    assert ours.encode(MESSAGES) == tok.encode("system: Be brief. \nuser: Hello there\nassistant:")
