"""Write a tiny random fp32 Hugging Face checkpoint (config.json, model.safetensors, tokenizer) offline.

usage: python make_tiny_hf.py KIND OUT_DIR
  KIND: llama | qwen3 | qwen3_moe | gpt_oss | deepseek_v3
Shapes: vocab 128, hidden 64, 4 heads, untied embeddings, fp32. Weights: transformers' own init
(seed 0) plus N(0, 0.05) noise on every saved tensor (parameters, then saved float buffers), so norms are
not all-ones and a wrong mapping shows.
Tokenizer: a word-level fast tokenizer over the tokens <unk> <s> </s> t3 .. t127 (built offline)."""
import os, sys, shutil
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

kind, out = sys.argv[1], sys.argv[2]
V, H, L, NH, NKV, HD, FF = 128, 64, 2, 4, 2, 16, 128
common = dict(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=NH,
              num_key_value_heads=NKV, head_dim=HD, max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
if kind == "llama":
    cfg = T.LlamaConfig(**common)
elif kind == "qwen3":   # dense Qwen3: q/k norms, no sliding window
    cfg = T.Qwen3Config(**common)
elif kind == "gpt_oss":
    # expert FFN 48 (not square with hidden 64: with a square gate_up_proj Megatron-Bridge 0.6.2's own round
    # trip transposes it); sliding window 16 on even layers (transformers' default layer_types), attention sinks,
    # q/k/v/o and expert biases. rope: transformers' GPT-OSS default (yarn, factor 32 over 4096), which
    # Megatron-Bridge hard-codes; max_position_embeddings 131072 = 32 * 4096, as in the released models.
    c = dict(common)
    c.update(intermediate_size=48, max_position_embeddings=131072)
    cfg = T.GptOssConfig(**c, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"])
elif kind == "qwen3_moe":
    cfg = T.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
elif kind == "deepseek_v3":
    c = dict(common)
    c.pop("head_dim")
    c.update(num_hidden_layers=3, num_key_value_heads=NH)   # MLA: kv heads == heads; layer 0 dense, 1-2 MoE
    cfg = T.DeepseekV3Config(**c, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4,
                             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                             q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                             v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
                             scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0,
                             bos_token_id=1, eos_token_id=2)   # the tokenizer's <s> / </s> (class default: 0 / 1)
else:
    raise SystemExit(f"unknown kind {kind}")
torch.manual_seed(0)
hf = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
with torch.no_grad():
    for p in hf.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    # saved float buffers too (DeepSeek-V3's router e_score_correction_bias, zeros at init); llama / qwen3 /
    # qwen3_moe / gpt_oss have none, so their RNG stream and bytes are unchanged
    params = {n for n, _ in hf.named_parameters()}
    for n, b in hf.state_dict().items():
        if n not in params and b.is_floating_point():
            b.add_(torch.randn_like(b) * 0.05)
shutil.rmtree(out, ignore_errors=True)
hf.save_pretrained(out)
vocab = {f"t{i}": i for i in range(3, V)}
vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>").save_pretrained(out)
print("saved", out, "transformers", T.__version__, sum(p.numel() for p in hf.parameters()), "params")
