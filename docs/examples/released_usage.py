# The released model's usage, with the model path swapped for the shipped denoiser and
# mask_token_id=model.mask_token_id (the released model's mask token is 3; ours is its own).
# On a GPU machine: model.place_towers_on_devices("cuda:0", "cuda:1") and input_ids.to("cuda:0").
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_name = "twotower/weights/smollm2-135m"
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=torch.bfloat16, trust_remote_code=True)
model.place_towers_on_devices("cpu", "cpu")
model.eval()

prompt = "The capital of France is"
input_ids = tokenizer(prompt, return_tensors="pt").input_ids
outputs = model.generate_mask_diffusion(
    input_ids,
    max_new_tokens=32,
    block_size=16,
    steps_per_block=16,
    mask_token_id=model.mask_token_id,
    temperature=0.0,
    confidence_threshold=0.8,
    eos_token_id=tokenizer.eos_token_id,
)
print(tokenizer.decode(outputs[0][input_ids.shape[1]:], skip_special_tokens=True))
print(f"NFE: {model._last_nfe}")
