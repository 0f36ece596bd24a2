"""Serving must not need the dev extras: generation from the default model in a fresh interpreter where importing
torch, accelerate or hypothesis fails gives the same greedy text as the in-process engine (which runs beside torch)."""
import json
import os
import subprocess
import sys

from jaxinfer import SamplingParams

BLOCKED = ("torch", "accelerate", "hypothesis")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 6

# The blocking comes first, before anything (jaxinfer, transformers, jax) is imported.
CHILD = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import {BLOCKED[0]}` now raises ImportError
import json
from jaxinfer import LLM, SamplingParams
llm = LLM("smollm2-135m", max_num_seqs=2, max_num_batched_tokens=32, max_model_len=256, num_kv_blocks=32,
          weight_dtype="float32")
prompt = llm.tokenizer.apply_chat_template({MESSAGES!r})
out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens={MAX_TOKENS}))[0]
loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in {BLOCKED!r} and mod is not None)
print("RESULT " + json.dumps({{"prompt": prompt, "token_ids": out.token_ids, "text": out.text, "loaded": loaded}}))
"""


def test_generation_without_torch_matches_in_process(llm):
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXINFER_QUIET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["loaded"] == []

    prompt = llm.tokenizer.apply_chat_template(MESSAGES)
    assert result["prompt"] == prompt
    expected = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))[0]
    assert result["token_ids"] == expected.token_ids and len(expected.token_ids) == MAX_TOKENS
    assert result["text"] == expected.text and result["text"].strip()
