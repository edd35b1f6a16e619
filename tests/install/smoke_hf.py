"""The installed wheel with the `[hf]` extra in a clean virtualenv (`make test-install`): a
tiny random Llama generates through rotatekv.hf; at 16 bits its greedy tokens are the
unmodified model's, at 2 bits it generates from a packed cache. Not collected by pytest."""

from __future__ import annotations

import torch
import transformers

import rotatekv
import rotatekv.hf

cfg = transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
with torch.no_grad():
    want = model.generate(ids, **kw)
    rotatekv.hf.enable(model, config=rotatekv.QuantConfig(bits=16))
    got16 = model.generate(ids, **kw)
    rotatekv.hf.enable(model, config=rotatekv.QuantConfig(bits=2, residual=4))
    got2 = model.generate(ids, **kw)
    rotatekv.hf.disable(model)
    again = model.generate(ids, **kw)
assert torch.equal(got16, want), (got16, want)
assert got2.shape == want.shape and torch.equal(again, want)
print("16-bit tokens:", want[0, 12:].tolist())
print(" 2-bit tokens:", got2[0, 12:].tolist())
print("ok")
