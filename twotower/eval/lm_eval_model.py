"""lm-evaluation-harness model class ``twotower`` (optional extra ``lmeval``).

  lm_eval --model twotower --model_args pretrained=smollm2-135m,mode=mask_diffusion,confidence_threshold=0.9 ...

``generate_until`` decodes with the chosen mode (``ar``, ``mask_diffusion``, ``mock_ar``);
``loglikelihood`` and ``loglikelihood_rolling`` score with the context tower, which is the
AR model itself (a block-diffusion model has no exact per-token likelihood of its own).
Importing this module registers the class with lm_eval.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..checkpoints import DEFAULT_MODEL
from ..generate import generate_ar
from ..generate.diffusion import generate_mask_diffusion, generate_mock_ar
from ..checkpoints.two_tower import load_two_tower
from ..model.devices import torch_dtype

MODES = ("ar", "mask_diffusion", "mock_ar")


@register_model("twotower")
class TwoTowerLM(LM):
    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        dtype: str = "float32",
        mode: str = "mask_diffusion",
        block_size: int | None = None,
        steps_per_block: int | None = None,
        confidence_threshold: float = 0.9,
        commit_rule: str | None = None,  # None: the model's recommendation, else the released rule
        verify: bool = False,
        max_gen_toks: int = 256,
        batch_size: int | str = 1,  # accepted for lm_eval's CLI; requests run one at a time
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        loaded = load_two_tower(pretrained, torch_dtype(dtype))
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.note = loaded.note  # set when the denoiser is untrained
        self.mode = mode
        self.dial = dict(block_size=block_size, steps_per_block=steps_per_block,
                         confidence_threshold=confidence_threshold, commit_rule=loaded.commit_rule(commit_rule),
                         verify=verify)
        self.max_gen_toks = max_gen_toks
        config = self.model.context.config
        self.max_length = config.max_position_embeddings
        # a scored text needs one token before it; BOS where the tokenizer has one, else EOS
        self.prefix_token = self.tokenizer.bos_token_id
        if self.prefix_token is None:
            self.prefix_token = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else config.eos_token_ids[0]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _logprobs(self, context: list[int], target: list[int]) -> tuple[float, bool]:
        """Sum of log p(target | context) under the AR context tower, and whether every target
        token is the greedy choice. The context is cut from the left to fit the model."""
        ids = (context + target)[-(self.max_length + 1) :]
        scored = ids[-len(target) - 1 :]  # the last input predicts nothing
        inputs = torch.tensor([ids[:-1]], device=self.model.context.device)
        logp = self.model.context_forward(inputs)[0, -len(target) :].float().log_softmax(-1)
        wanted = torch.tensor(scored[1:], device=logp.device)
        total = float(logp.gather(1, wanted[:, None]).sum())
        return total, bool((logp.argmax(-1) == wanted).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=len(requests) < 2):
            context, continuation = req.args
            # encode together and split, so a word split across the boundary tokenises as in the text
            whole = self._encode(context + continuation)
            n_ctx = len(self._encode(context))
            ctx, target = whole[:n_ctx], whole[n_ctx:]
            if not target:  # the continuation merged into the context's last token
                ctx, target = self._encode(context), self._encode(continuation)
            out.append(self._logprobs([self.prefix_token] + ctx, target))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = self._encode(req.args[0])
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_token, max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._logprobs(ctx, target)[0] for ctx, target in windows))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in tqdm(requests, desc=f"generate ({self.mode})", disable=len(requests) < 2):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            # keep the prompt's end; the last diffusion block may run up to block_size - 1 past max_new
            room = self.max_length - max_new - (self.dial["block_size"] or self.model.block_size)
            ids = ([self.prefix_token] + self._encode(context))[-room:]
            sampling = dict(max_new_tokens=max_new, temperature=float(gen_kwargs.get("temperature", 0.0))
                            if gen_kwargs.get("do_sample") else 0.0)
            if self.mode == "ar":
                tokens = generate_ar(self.model.context, ids, **sampling).tokens[0]
            elif self.mode == "mock_ar":
                tokens = generate_mock_ar(self.model, ids, commit_rule=self.dial["commit_rule"], **sampling).tokens[0]
            else:
                tokens = generate_mask_diffusion(self.model, ids, **self.dial, **sampling).tokens[0]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=len(text))
            out.append(text[:cut])
        return out
